"""Student specs and presets: validation, building, distilling, export, self-describing files."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from callbacks.export import ExportStudent, flatten_windows
from compress.complexity import PRESET_DIR, preset_names
from compress.fold import fold_batchnorm
from compress.quantize import psnr, quantize_int8
from data.dataset import WindowDataset
from data.synthetic import make_synthetic_dataset
from models.distiller import DistillationModule
from models.init import init_from_teacher_
from models.spec import StudentSpec
from models.student import load_student, save_student
from models.wav2lip import Wav2Lip

ROOT = Path(__file__).resolve().parents[1]
PRESETS = preset_names()


def build_preset(name: str) -> Wav2Lip:
    return instantiate(OmegaConf.load(PRESET_DIR / f"{name}.yaml"))


@pytest.fixture(scope="module")
def teacher() -> Wav2Lip:
    torch.manual_seed(0)
    return Wav2Lip().eval()


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "s", n_clips=2, n_val=1)
    dataset = WindowDataset(root, "train", length=1, deterministic=True)
    window = torch.utils.data.default_collate([dataset[0]])
    # Two of the five time steps: enough for the 5-D path, and a quarter of the teacher's work.
    return {"mel": window["mel"][:, :2], "face": window["face"][:, :, :2],
            "target": window["target"][:, :, :2]}


def test_required_presets_exist() -> None:
    assert {"slim50", "slim25", "nota_like", "micro"} <= set(PRESETS), PRESETS


def test_nota_like_matches_nota_widths() -> None:
    spec = build_preset("nota_like").spec
    assert spec.face_widths() == (4, 8, 16, 32, 64, 128, 128)
    assert spec.audio_widths() == (8, 16, 32, 64, 128)
    assert spec.decoder_widths() == (128, 128, 128, 96, 64, 32, 16)
    assert spec.head_width() == 8
    assert all(sum(c) == 0 for c in spec.residual_counts().values())


def test_dropped_residuals_keep_released_key_pattern() -> None:
    spec = StudentSpec(slim=0.25, face_residuals=(0, 1, 0, 0, 0, 0), audio_residuals=(0, 1, 0, 0),
                       decoder_residuals=(0, 0, 0, 0, 0, 2))
    keys = Wav2Lip(spec=spec).state_dict()
    assert "face_encoder_blocks.1.1.conv_block.0.weight" in keys
    assert "face_encoder_blocks.2.1.conv_block.0.weight" not in keys
    # Audio: stage convs at 0, 1 (+ its residual at 2), 3, 4, then the embedding convs at 5, 6.
    assert "audio_encoder.6.conv_block.0.weight" in keys
    assert "audio_encoder.7.conv_block.0.weight" not in keys
    assert "face_decoder_blocks.6.2.conv_block.0.weight" in keys
    assert "face_decoder_blocks.5.1.conv_block.0.weight" not in keys


def test_slim_override_works_through_hydra() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["student=nota_like", "student.slim=0.5",
                                          "student.decoder_residuals=[0,0,0,0,0,1]"])
    student = instantiate(cfg.student)
    assert student.spec.name == "nota_like" and student.spec.slim == 0.5
    assert student.spec.face_widths()[0] == 8 and len(student.face_decoder_blocks[6]) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"slim": 0.0}, "slim must be in"),
        ({"face": (4, 8)}, "face has 2 widths, needs 7"),
        ({"decoder": (0, None, None, None, None, None, None)}, "must be a positive int"),
        ({"audio_residuals": (3, 2, 2, 1)}, "must count 0 to the original"),
        ({"head": -1}, "head width"),
    ],
)
def test_spec_errors_are_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        StudentSpec(**kwargs)
    assert "\n" not in str(err.value)


def test_spec_round_trips_as_plain_data() -> None:
    spec = build_preset("micro").spec
    data = spec.to_dict()
    assert all(isinstance(v, (list, float, str, int, type(None))) for v in data.values()), data
    assert StudentSpec.from_dict(data) == spec
    with pytest.raises(ValueError, match="unknown StudentSpec keys"):
        StudentSpec.from_dict({**data, "depth": 3})


@pytest.mark.parametrize("name", PRESETS)
def test_preset_forwards_distils_and_exports(
    name: str, teacher: Wav2Lip, batch: dict[str, torch.Tensor]
) -> None:
    torch.manual_seed(1)
    student = init_from_teacher_(build_preset(name), teacher)
    mel, face = batch["mel"], batch["face"]
    flat_mel, flat_face = flatten_windows(batch)
    student.eval()
    with torch.no_grad():
        windowed, flat = student(mel, face), student(flat_mel, flat_face)
    steps = mel.shape[1]
    assert windowed.shape == (1, 3, steps, 96, 96) and flat.shape == (steps, 3, 96, 96)
    assert torch.allclose(windowed[0].transpose(0, 1), flat, atol=1e-6)

    optimizer = functools.partial(torch.optim.Adam, lr=1e-3)
    module = DistillationModule(student, teacher, optimizer, feature_taps=(3, 4, 5)).train()
    opt = module.configure_optimizers()
    for _ in range(2):
        loss = module._losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss), f"{name}: loss {loss}"

    folded = fold_batchnorm(student.eval())
    program = quantize_int8(folded, [(flat_mel, flat_face)])
    with torch.no_grad():
        quality = psnr(program.module()(flat_mel, flat_face), folded(flat_mel, flat_face))
    assert quality > 25.0, f"{name}: int8 vs float PSNR {quality:.1f} dB"


def test_student_file_loads_in_a_fresh_process(tmp_path: Path) -> None:
    torch.manual_seed(2)
    student = build_preset("micro").eval()
    with torch.no_grad():
        for bn in student.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.normal_(0.0, 0.1)  # weights beyond the defaults must travel
    path = save_student(student, tmp_path / "student.pt")
    mel, face = torch.randn(2, 1, 80, 16), torch.rand(2, 6, 96, 96)
    torch.save({"mel": mel, "face": face}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = student(mel, face)
    script = textwrap.dedent(f"""
        import sys, torch
        from models.student import load_student
        assert not {{"hydra", "lightning", "omegaconf"}} & set(sys.modules), sorted(sys.modules)
        model = load_student({str(path)!r})
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            torch.save(model(inputs["mel"], inputs["face"]), {str(tmp_path / "out.pt")!r})
        print(model.spec.name)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "micro"
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    assert torch.equal(load_student(path)(mel, face).detach(), expected)


def test_load_student_rejects_other_files(tmp_path: Path) -> None:
    torch.save(Wav2Lip(0.25).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="is not a student checkpoint") as err:
        load_student(tmp_path / "bare.pt")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_student(tmp_path / "none.pt")


def test_export_writes_student_file_and_preset_report(
    teacher: Wav2Lip, batch: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    torch.manual_seed(3)
    student = init_from_teacher_(build_preset("nota_like"), teacher)
    optimizer = functools.partial(torch.optim.Adam, lr=1e-3)
    module = DistillationModule(student, teacher, optimizer)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert StudentSpec.from_dict(checkpoint["student_spec"]) == student.spec

    loader = [batch]
    datamodule = SimpleNamespace(train_dataloader=lambda: loader, val_dataloader=lambda: loader)
    trainer = SimpleNamespace(interrupted=False, datamodule=datamodule)
    ExportStudent(str(tmp_path), calibration_batches=1).on_fit_end(trainer, module)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["student_preset"] == "nota_like"
    assert report["student_spec"] == student.spec.to_dict()
    assert report["parameters"]["student"] == 1_258_143
    loaded = load_student(tmp_path / "student.pt")
    mel, face = flatten_windows(batch)
    with torch.no_grad():
        assert torch.equal(loaded(mel, face), student.eval()(mel, face))
