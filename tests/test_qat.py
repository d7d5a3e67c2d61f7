"""Quantization-aware training: schedule, a crash and resume mid-QAT, int8 export, fresh load.

One scenario, shared by the tests through a module fixture: a tiny student is distilled with
the real DistillationModule from a small random teacher, on the generated sample. Run 1 trains
as float for two steps, turns fake quantization on at step 2, freezes BatchNorm at step 3, is
checkpointed at step 4 and crashes. Run 2, a fresh module, callback and trainer, resumes from
that checkpoint, freezes the observers at step 5 and ends at step 6 with the QAT int8 export.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import astuple
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.qat import QATPhase, QuantizationAwareTraining
from compress.qat import QATStudent
from compress.quantize import load_program, psnr
from data.dataset import Wav2LipDataModule
from data.synthetic import make_synthetic_dataset
from models.distiller import DistillationModule
from models.wav2lip import Wav2Lip

# Two short fits, two QAT preparations and one int8 conversion (torchao traces ~100 patterns).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
START, FREEZE_BN, SAVE_AT, FREEZE_OBSERVERS, STEPS = 2, 3, 4, 5, 6
TAPS = ("face_decoder.3", "face_decoder.5")
BN_MEAN = "face_encoder_blocks.1.0.conv_block.1.running_mean"
N_CONVS = 51  # the original layout, residual layers included
# The int8 program computes the fake-quantized network's arithmetic (identical here, inf dB);
# the floor leaves room for BatchNorm folding rounding differently on other kernels.
MIN_INT8_VS_FAKE_QUANT_DB = 40.0


class Crash(RuntimeError):
    """Ends run 1 right after its mid-QAT checkpoint, as a killed job would."""


def _held_out() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.rand(3, 1, 80, 16, generator=generator) * 8 - 4, torch.rand(
        3, 6, 96, 96, generator=generator)


def _fake_quant_scales(student: QATStudent) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in student.prepared.state_dict().items()
            if k.endswith(".scale")}


@torch.no_grad()
def _eval_output(student: torch.nn.Module) -> torch.Tensor:
    mode = student.training
    out = student.eval()(*_held_out())
    student.train(mode)
    return out


class Probe(L.Callback):
    """Records what the tests compare; placed after the QAT callback, so it sees each phase."""

    def __init__(self, qat: QuantizationAwareTraining, crash_at: int | None = None) -> None:
        self.qat, self.crash_at = qat, crash_at
        self.record: dict[str, Any] = {"phases": {}, "bn_mean": {}}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["start_step"] = trainer.global_step
        self.record["start_phase"] = self.qat.phase
        self.record["start_output"] = _eval_output(pl_module.student)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.crash_at:
            raise Crash(f"stopped at step {step}")
        student = pl_module.student
        assert isinstance(student, QATStudent), type(student)
        self.record["phases"][step] = astuple(self.qat.phase)
        self.record["bn_mean"][step] = student.float_state_dict()[BN_MEAN].clone()
        if step == FREEZE_BN:
            # BatchNorm is now frozen: activation ranges must be the ones observed so far.
            state = student.prepared.state_dict()
            self.record["act_min_at_bn_freeze"] = [
                float(v) for k, v in state.items() if k.endswith(".min_val") and v.dim() == 0]
        if step == FREEZE_OBSERVERS:
            self.record["scales_at_freeze"] = _fake_quant_scales(student)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # Runs before ModelCheckpoint saves (checkpoint callbacks go last).
        student = pl_module.student
        if trainer.global_step == SAVE_AT:
            self.record["saved_output"] = _eval_output(student)
        if trainer.global_step == STEPS:
            self.record["final_scales"] = _fake_quant_scales(student)
            self.record["final_float_state"] = student.float_state_dict()
            self.record["final_student"] = copy.deepcopy(student)


def _module() -> DistillationModule:
    torch.manual_seed(0)
    teacher = Wav2Lip(slim=0.125).eval()
    with torch.no_grad():
        # A random generator is nearly flat grey; a sharper output layer gives it contrast.
        teacher.output_block[1].weight.mul_(40)
    student = Wav2Lip(slim=0.0625)
    optimizer = functools.partial(torch.optim.Adam, lr=1e-3)
    return DistillationModule(student, teacher, optimizer, feature_taps=TAPS, sync=0.0)


def _trainer(tmp: Path, callbacks: list[L.Callback], checkpoint: bool) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, limit_val_batches=1,
                     val_check_interval=SAVE_AT, check_val_every_n_epoch=None,
                     num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=checkpoint,
                     callbacks=callbacks, default_root_dir=tmp)


def _callback(output_dir: Path) -> QuantizationAwareTraining:
    return QuantizationAwareTraining(
        str(output_dir), start_step=START, freeze_bn_step=FREEZE_BN,
        freeze_observer_step=FREEZE_OBSERVERS, keep_float=["output_block.1"],
        calibration_batches=2, validation_batches=1)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("qat")
    root = make_synthetic_dataset(tmp / "data", n_clips=2, n_val=1, seconds=2.0)
    data = Wav2LipDataModule(str(root), batch_size=1, train_samples=16, val_samples=2)

    qat1 = _callback(tmp / "export1")
    probe1 = Probe(qat1, crash_at=SAVE_AT)
    saver = ModelCheckpoint(dirpath=tmp / "ckpt", filename="step{step}",
                            every_n_train_steps=SAVE_AT, save_top_k=-1,
                            auto_insert_metric_name=False)
    with pytest.raises(Crash):
        _trainer(tmp, [qat1, probe1, saver], checkpoint=True).fit(_module(), datamodule=data)
    checkpoint = tmp / "ckpt" / f"step{SAVE_AT}.ckpt"

    qat2 = _callback(tmp / "export2")
    probe2 = Probe(qat2)
    module = _module()
    _trainer(tmp, [qat2, probe2], checkpoint=False).fit(module, datamodule=data,
                                                         ckpt_path=checkpoint)
    return {"run1": probe1.record, "run2": probe2.record, "qat": qat2, "module": module,
            "checkpoint": checkpoint, "export": tmp / "export2"}


def test_schedule_switches_phases_and_freezes(scenario: dict[str, Any]) -> None:
    phases = {**scenario["run1"]["phases"], **scenario["run2"]["phases"]}
    expected = {0: (False, False, False), 1: (False, False, False), 2: (True, True, False),
                3: (True, True, True), 4: (True, True, True), 5: (True, False, True)}
    assert phases == expected, phases
    bn_mean = {**scenario["run1"]["bn_mean"], **scenario["run2"]["bn_mean"]}
    # BatchNorm statistics move while it trains (steps 0-2) and stay put once frozen (3-5).
    assert not torch.equal(bn_mean[2], bn_mean[3])
    assert torch.equal(bn_mean[3], bn_mean[4]) and torch.equal(bn_mean[4], bn_mean[5])
    # Not restarted (inf) when BatchNorm freezes: see callbacks/qat.py.
    kept = scenario["run1"]["act_min_at_bn_freeze"]
    assert len(kept) > 20 and all(math.isfinite(v) for v in kept), kept[:5]
    at_freeze, final = scenario["run2"]["scales_at_freeze"], scenario["run2"]["final_scales"]
    assert at_freeze.keys() == final.keys() and len(final) > 20, len(final)
    assert all(torch.equal(at_freeze[k], final[k]) for k in final), "scales moved after freeze"
    assert any(v.numel() > 1 for v in final.values()), "no per-channel weight scale"


def test_checkpoint_mid_qat_restores_model_and_phase(scenario: dict[str, Any]) -> None:
    checkpoint = torch.load(scenario["checkpoint"], weights_only=False)
    state = checkpoint["state_dict"]
    for part in ("activation_post_process", ".scale", ".min_val", ".max_val", "running_mean"):
        assert any(part in k and k.startswith("student.prepared.") for k in state), part
    saved = checkpoint["callbacks"]["QuantizationAwareTraining"]
    assert saved["step"] == SAVE_AT - 1 and saved["phase"]["bn_frozen"], saved

    run1, run2 = scenario["run1"], scenario["run2"]
    assert run2["start_step"] == SAVE_AT
    assert run2["start_phase"] == QATPhase(fake_quant=True, observing=True, bn_frozen=True)
    before, after = run1["saved_output"], run2["start_output"]
    assert torch.allclose(before, after, rtol=0, atol=1e-6), (before - after).abs().max()


def test_float_student_is_back_with_the_trained_weights(scenario: dict[str, Any]) -> None:
    student = scenario["module"].student
    assert type(student) is Wav2Lip and student.spec.slim == 0.0625
    trained = scenario["run2"]["final_float_state"]
    prepared = copy.deepcopy(scenario["run2"]["final_student"])
    quantized = prepared.fake_quantized_weights()
    # Every conv weight but output_block.1's (kept float) is fake-quantized.
    assert len(quantized) == N_CONVS - 1 and "output_block.1.weight" not in quantized
    state = student.state_dict()
    assert state.keys() == trained.keys()
    for key, value in state.items():
        assert torch.equal(value, quantized.get(key, trained[key])), key
    # The prepared graph with fake quantization off, on the same weights, is the float student.
    prepared.load_float_state_dict(state)
    prepared.set_phase(False, False, True)
    out, reference = _eval_output(student), _eval_output(prepared)
    assert torch.allclose(out, reference, rtol=0, atol=1e-5), (out - reference).abs().max()


def test_float_student_keeps_what_the_fake_quantizers_clamp(scenario: dict[str, Any]) -> None:
    """Latent weights that drift out of frozen ranges must not reach the float student."""
    prepared = copy.deepcopy(scenario["run2"]["final_student"])
    prepared.set_phase(True, False, True)
    with torch.no_grad():
        # As Adam's momentum can do after the observers freeze: far outside the frozen ranges.
        for name in prepared.fake_quantized_weights():
            prepared.prepared.get_parameter(f"student.{name}").mul_(4)
    fake_quantized = _eval_output(prepared)
    floor = MIN_INT8_VS_FAKE_QUANT_DB
    assert psnr(_eval_output(prepared.to_float()), fake_quantized) >= floor
    prepared.set_phase(False, False, True)
    assert psnr(_eval_output(prepared.to_float()), fake_quantized) < floor - 10, (
        "the drift should show in the latent weights: the test would not catch a regression")


def test_report_compares_qat_and_post_training_int8(scenario: dict[str, Any]) -> None:
    report = json.loads((scenario["export"] / "qat_report.json").read_text())
    quality = report["psnr_db"]
    for key in ("qat_int8_vs_float_student", "ptq_int8_vs_float_student",
                "qat_int8_vs_teacher", "ptq_int8_vs_teacher", "float_student_vs_teacher"):
        assert math.isfinite(quality[key]) and quality[key] > 10.0, (key, quality[key])
    assert quality["qat_int8_vs_fake_quant"] >= MIN_INT8_VS_FAKE_QUANT_DB, quality
    assert report["steps"] == STEPS and report["keep_float"] == ["output_block.1"]
    assert report["schedule"]["freeze_observer_step"] == FREEZE_OBSERVERS
    assert scenario["qat"].outputs["QAT report"].endswith("qat_report.json")


def test_export_loads_in_fresh_process(scenario: dict[str, Any], tmp_path: Path) -> None:
    """Plain torch + torchao, no repository code on the path; int8 weights, any batch size."""
    path = scenario["export"] / "student_qat_int8.pt2"
    inputs = {n: tuple(t[:n] for t in _held_out()) for n in (1, 3)}
    inputs_path, outputs_path = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(inputs, inputs_path)
    script = textwrap.dedent(
        f"""
        import torch, torchao
        ep = torch.export.load({str(path)!r})
        student = ep.module()
        stored = [*ep.state_dict.values(), *ep.constants.values()]
        weights = [t for t in stored if isinstance(t, torch.Tensor) and t.dim() == 4]
        inputs = torch.load({str(inputs_path)!r})
        with torch.no_grad():
            out = {{n: student(mel, face) for n, (mel, face) in inputs.items()}}
        dtypes = sorted({{str(t.dtype) for t in weights}})
        torch.save({{"out": out, "dtypes": dtypes, "n": len(weights)}}, {str(outputs_path)!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -I: isolated mode, so neither the working directory nor PYTHONPATH can supply project code.
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = torch.load(outputs_path)
    # keep_float=["output_block.1"] leaves the last 1x1 conv float: every other weight is int8.
    assert fresh["dtypes"] == ["torch.float32", "torch.int8"], fresh["dtypes"]
    loaded = load_program(path)
    # Same file layout as the post-training program: transposed-conv weights stored transposed.
    transposed = [n for n in loaded.graph.nodes
                  if n.target == torch.ops.aten.conv_transpose2d.input]
    assert len(transposed) == 6
    assert all(n.args[1].target == torch.ops.aten.permute.default for n in transposed)
    program = loaded.module()
    for n, (mel, face) in inputs.items():
        with torch.no_grad():
            reference = program(mel, face)
        assert fresh["out"][n].shape == (n, 3, 96, 96)
        assert torch.equal(fresh["out"][n], reference), f"batch {n}: fresh process differs"
    student = Wav2Lip(slim=0.0625)
    student.load_state_dict(scenario["run2"]["final_float_state"])
    quality = psnr(program(*_held_out()), _eval_output(student))
    assert quality > 20.0, f"QAT int8 vs its float weights: {quality:.2f} dB"


def test_prepared_student_keeps_the_student_interface(scenario: dict[str, Any]) -> None:
    prepared = copy.deepcopy(scenario["run2"]["final_student"])
    student = scenario["module"].student
    assert prepared.decoder_widths() == student.decoder_widths()
    assert prepared.feature_widths() == student.feature_widths()
    assert prepared.spec == student.spec and prepared.slim == student.slim
    # Same parameter order and shapes: an optimizer state saved before QAT still fits.
    assert [p.shape for p in prepared.parameters()] == [p.shape for p in student.parameters()]
    prepared.load_float_state_dict(student.state_dict())
    prepared.set_phase(False, False, True)
    generator = torch.Generator().manual_seed(8)
    mel, face = torch.rand(2, 5, 1, 80, 16, generator=generator), torch.rand(
        2, 6, 5, 96, 96, generator=generator)
    prepared.eval(), student.eval()
    with torch.no_grad():
        out, feats = prepared.forward_with_features(mel, face, TAPS[:1])
        ref, ref_feats = student.forward_with_features(mel, face, TAPS[:1])
    assert out.shape == (2, 3, 5, 96, 96) and feats.keys() == {TAPS[0]}
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert torch.allclose(feats[TAPS[0]], ref_feats[TAPS[0]], atol=1e-5)
    with pytest.raises(ValueError, match="not traced"):
        prepared.forward_with_features(mel, face, ("face_decoder.4",))


def test_transposed_conv_weights_fake_quantized_per_output_channel(
    scenario: dict[str, Any]
) -> None:
    graph = scenario["run2"]["final_student"].prepared
    axes = {}
    for node in graph.graph.nodes:
        if node.target == torch.ops.aten.conv_transpose2d.input:
            fake_quant = graph.get_submodule(node.args[1].target)
            axes[node.name] = fake_quant.ch_axis
    # (in, out, kH, kW) weights: output channels on axis 1, as in the post-training program.
    assert len(axes) == 6 and set(axes.values()) == {1}, axes


def test_float_weights_load_into_the_prepared_graph(scenario: dict[str, Any]) -> None:
    """What resuming a checkpoint saved before QAT relies on."""
    prepared = copy.deepcopy(scenario["run2"]["final_student"])
    torch.manual_seed(4)
    other = Wav2Lip(slim=0.0625).state_dict()
    prepared.load_float_state_dict(other)
    loaded = prepared.float_state_dict()
    assert loaded.keys() == other.keys()
    assert all(torch.equal(v, other[k]) for k, v in loaded.items())
    with pytest.raises(ValueError, match="do not fit"):
        prepared.load_float_state_dict({**other, "extra.weight": torch.zeros(1)})


def test_config_adds_qat_to_default_callbacks(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["callbacks=qat", f"paths.output_dir={tmp_path}"])
    assert cfg.callbacks.export._target_ == "callbacks.export.ExportStudent"
    qat = instantiate(cfg.callbacks.qat)
    assert isinstance(qat, QuantizationAwareTraining)
    assert qat.output_dir == tmp_path / "export"
    # The recommended recipe: calibrated ranges frozen from the start of QAT, BatchNorm free.
    assert qat.start_step == qat.freeze_observer_step < cfg.trainer.max_steps
    assert qat.freeze_bn_step is None and qat.calibrate_ranges
    with pytest.raises(ValueError, match="before qat.start_step"):
        QuantizationAwareTraining(str(tmp_path), start_step=5, freeze_bn_step=2)


def _activation_scales(student: QATStudent) -> dict[str, float]:
    return {name: float(fq.scale) for name, fq in student._activation_quantizers().items()}


def test_calibrated_ranges_give_the_post_training_int8_network() -> None:
    from compress.fold import fold_batchnorm
    from compress.qat import convert_qat, prepare_qat
    from compress.quantize import quantize_int8

    torch.manual_seed(0)
    student = Wav2Lip(slim=0.0625)
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.rand(4, 1, 80, 16, generator=generator) * 8 - 4,
                torch.rand(4, 6, 96, 96, generator=generator)) for _ in range(2)]
    with torch.no_grad():
        student.train()(*batches[0])  # BatchNorm statistics of its own activations
    qat = prepare_qat(student)
    before = _activation_scales(qat)
    qat.set_phase(fake_quant=True, observe=False, freeze_bn=False)
    ranges = qat.calibrate_activations(batches)

    assert len(ranges) == len(before) > 10
    assert all(low <= 0.0 < high for low, high in ranges.values())
    assert _activation_scales(qat) != before
    qat_int8 = convert_qat(qat).module()
    ptq_int8 = quantize_int8(fold_batchnorm(student.eval()), batches).module()
    with torch.no_grad():
        held = _held_out()
        float_out, qat_out, ptq_out = student(*held), qat_int8(*held), ptq_int8(*held)
        fake_quant_out = qat.eval()(*held)
    # The same histograms and weights: QAT's first int8 network is the post-training one.
    assert psnr(qat_out, ptq_out) >= 40.0
    assert psnr(qat_out, fake_quant_out) >= MIN_INT8_VS_FAKE_QUANT_DB
    assert psnr(qat_out, float_out) > 25.0


class ScaleProbe(L.Callback):
    """Activation scales of the QAT student at each step, after the QAT callback ran."""

    def __init__(self) -> None:
        self.scales: dict[int, dict[str, float]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self.scales[trainer.global_step] = _activation_scales(pl_module.student)


def test_callback_calibrates_ranges_when_observers_freeze(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "data", n_clips=2, n_val=1, seconds=2.0)
    data = Wav2LipDataModule(str(root), batch_size=1, train_samples=8, val_samples=2)
    qat = QuantizationAwareTraining(
        str(tmp_path / "export"), start_step=1, freeze_observer_step=1, calibrate_ranges=True,
        calibration_batches=2, validation_batches=1)
    probe = ScaleProbe()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, limit_val_batches=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[qat, probe],
                        default_root_dir=tmp_path)
    trainer.fit(_module(), datamodule=data)

    # Float at step 0 (the prepared graph's initial scale of 1), calibrated at step 1, and the
    # frozen observers keep those ranges to the end.
    assert set(probe.scales[0].values()) == {1.0}
    assert probe.scales[1] == probe.scales[2]
    assert len(set(probe.scales[1].values())) > 5
    report = json.loads((tmp_path / "export" / "qat_report.json").read_text())
    assert report["schedule"]["calibrate_ranges"] is True
    assert report["psnr_db"]["qat_int8_vs_fake_quant"] >= MIN_INT8_VS_FAKE_QUANT_DB
