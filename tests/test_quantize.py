"""Static int8 PT2E quantization: storage, size, portability, fidelity, fusion, sensitivity."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram

from compress.fold import fold_batchnorm, fuse_for_inference
from compress.quantize import ConvInt8Quantizer, load_program, psnr, quantize_int8, save_program
from compress.sensitivity import conv_layers, format_table, layer_sensitivity, most_sensitive
from models.spec import StudentSpec
from models.wav2lip import Wav2Lip

MIN_PSNR_DB = 30.0
MAX_SIZE_RATIO = 0.35
CONV_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.conv_transpose2d.input)
# nota_like's shape (no residual layers) at quarter width: 23 convs, 6 of them transposed.
PLAIN_SPEC = StudentSpec(slim=0.25, face_residuals=[0] * 6, audio_residuals=[0] * 4,
                         decoder_residuals=[0] * 6)


def image_like(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mels in [-4, 4] and smooth faces in [0, 1] whose target half is masked, as in inference."""
    mel = torch.rand(n, 1, 80, 16, generator=generator) * 8 - 4
    coarse = torch.rand(n, 6, 12, 12, generator=generator)
    face = F.interpolate(coarse, size=96, mode="bilinear", align_corners=False)
    face[:, :3, 48:] = 0
    return mel, face


def measure_batchnorm_(model: nn.Module) -> nn.Module:
    """Set every BatchNorm's statistics to those of the model's own activations; returns it.

    Default statistics (mean 0, var 1) let activations shrink layer by layer until the output is
    almost constant, which any quantizer reproduces; measured statistics keep every layer busy,
    like a trained network.
    """
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None  # cumulative average: running stats become the batch stats
    model.train()
    with torch.no_grad():
        model(*image_like(16, torch.Generator().manual_seed(1)))
    return model.eval()


@pytest.fixture(scope="module")
def student() -> nn.Module:
    """A seeded slim-0.25 student with measured BatchNorm statistics, folded."""
    torch.manual_seed(0)
    return fold_batchnorm(measure_batchnorm_(Wav2Lip(slim=0.25)))


@pytest.fixture(scope="module")
def calibration() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [image_like(8, generator) for _ in range(4)]


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    return image_like(8, torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def saved(
    student: nn.Module,
    calibration: list[tuple[torch.Tensor, torch.Tensor]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    path = tmp_path_factory.mktemp("int8") / "student_int8.pt2"
    save_program(quantize_int8(student, calibration), path)
    return path


@pytest.fixture(scope="module")
def loaded(saved: Path) -> ExportedProgram:
    return load_program(saved)


def _weight_tensors(program: ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> stored tensor, for parameters, buffers and lifted constants."""
    sig = program.graph_signature
    stored = {**program.state_dict, **program.constants}
    names = {
        **sig.inputs_to_parameters,
        **sig.inputs_to_buffers,
        **sig.inputs_to_lifted_tensor_constants,
    }
    return {placeholder: stored[target] for placeholder, target in names.items()}


def test_conv_weights_are_stored_as_int8(student: nn.Module, loaded: ExportedProgram) -> None:
    tensors = _weight_tensors(loaded)
    convt_shapes = sorted(
        tuple(m.weight.shape) for m in student.modules() if isinstance(m, nn.ConvTranspose2d)
    )
    n_conv = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in student.modules())
    seen_convt = []
    convs = [n for n in loaded.graph.nodes if n.op == "call_function" and n.target in CONV_OPS]
    assert len(convs) == n_conv == 51, f"{len(convs)} conv nodes, student has {n_conv} convs"
    for node in convs:
        dequant = node.args[1]
        transposed = node.target == torch.ops.aten.conv_transpose2d.input
        if transposed:
            # Stored (out, in, kH, kW) and permuted back after dequantizing (see
            # protect_transposed_convs), so the per-channel axis is the output channels' 0.
            assert dequant.target == torch.ops.aten.permute.default, f"{node.name}: {dequant}"
            assert dequant.args[1] == [1, 0, 2, 3], dequant.args
            dequant = dequant.args[0]
        assert "dequantize_per_channel" in str(dequant.target), f"{node.name}: {dequant.target}"
        weight = tensors[dequant.args[0].name]
        assert weight.dtype == torch.int8, f"{node.name} weight stored as {weight.dtype}"
        assert dequant.args[3] == 0, f"{node.name}: per-channel axis {dequant.args[3]}"
        if transposed:
            seen_convt.append((weight.shape[1], weight.shape[0], *weight.shape[2:]))
    assert sorted(seen_convt) == convt_shapes, (seen_convt, convt_shapes)
    float_4d = [k for k, t in tensors.items() if t.is_floating_point() and t.dim() == 4]
    assert not float_4d, f"float conv weights still stored: {float_4d}"


def test_saved_file_is_small(student: nn.Module, saved: Path, tmp_path: Path) -> None:
    """Compared with the float student both as a state_dict and as a float torch.export."""
    state_path = tmp_path / "student_fp32.pth"
    torch.save(student.state_dict(), state_path)
    batch = torch.export.Dim("batch", min=1)
    example = image_like(2, torch.Generator().manual_seed(4))
    float_program = torch.export.export(student, example, dynamic_shapes=({0: batch}, {0: batch}))
    float_path = tmp_path / "student_fp32.pt2"
    save_program(float_program, float_path)

    size = saved.stat().st_size
    for reference in (state_path, float_path):
        ratio = size / reference.stat().st_size
        assert ratio <= MAX_SIZE_RATIO, (
            f"int8 file {size / 1e6:.2f} MB is {ratio:.3f}x {reference.name} "
            f"({reference.stat().st_size / 1e6:.2f} MB)"
        )


def test_int8_output_matches_float_student(
    student: nn.Module, loaded: ExportedProgram, held_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    with torch.no_grad():
        reference = student(*held_out)
        out = loaded.module()(*held_out)
    assert out.shape == reference.shape == (8, 3, 96, 96), out.shape
    assert reference.std() > 0.05, f"float output nearly constant (std {reference.std():.3f})"
    quality = psnr(out, reference)
    assert quality >= MIN_PSNR_DB, f"int8 vs float PSNR {quality:.2f} dB on held-out inputs"


def test_loads_in_fresh_process_with_new_batch_sizes(
    student: nn.Module, saved: Path, tmp_path: Path
) -> None:
    """Plain torch + torchao, no repository code on the path, batch sizes never calibrated."""
    generator = torch.Generator().manual_seed(5)
    inputs = {n: image_like(n, generator) for n in (1, 7)}
    inputs_path, outputs_path = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(inputs, inputs_path)
    script = textwrap.dedent(
        f"""
        import torch, torchao
        ep = torch.export.load({str(saved)!r})
        inputs = torch.load({str(inputs_path)!r})
        with torch.no_grad():
            out = {{n: ep.module()(mel, face) for n, (mel, face) in inputs.items()}}
        torch.save(out, {str(outputs_path)!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -I: isolated mode, so neither the working directory nor PYTHONPATH can supply project code.
    result = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(outputs_path)
    for n, (mel, face) in inputs.items():
        with torch.no_grad():
            reference = student(mel, face)
        assert outputs[n].shape == (n, 3, 96, 96), f"batch {n}: {outputs[n].shape}"
        quality = psnr(outputs[n], reference)
        assert quality >= MIN_PSNR_DB, f"batch {n}: int8 vs float PSNR {quality:.2f} dB"


def test_keep_float_leaves_named_convs_unannotated(
    student: nn.Module, calibration: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    batch = torch.export.Dim("batch", min=1)
    graph = torch.export.export(
        student, calibration[0], dynamic_shapes=({0: batch}, {0: batch})
    ).module()
    ConvInt8Quantizer(keep_float=("output_block",)).annotate(graph)
    annotated = [n for n in graph.graph.nodes
                 if n.target in CONV_OPS and "quantization_annotation" in n.meta]
    assert len(annotated) == 51 - 2, f"{len(annotated)} convs annotated; output_block has 2"
    relus = [n for n in graph.graph.nodes if "quantization_annotation" in n.meta
             and n.target == torch.ops.aten.relu.default]
    assert len(relus) == 22 - 1, f"{len(relus)} fused ReLUs; output_block.0's is float"
    with pytest.raises(ValueError, match="match no conv"):
        ConvInt8Quantizer(keep_float=("output_blok",)).annotate(graph)


def test_conv_relu_pairs_are_one_pattern_residual_layers_are_not(
    student: nn.Module, calibration: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Slim 0.25 keeps all 28 residual layers; the other 22 conv blocks end in a plain ReLU."""
    graph = torch.export.export(student, calibration[0]).module()
    ConvInt8Quantizer().annotate(graph)
    relus = [n for n in graph.graph.nodes if n.target == torch.ops.aten.relu.default]
    fused = [n for n in relus if "quantization_annotation" in n.meta]
    assert len(relus) == 50 and len(fused) == 22, (len(relus), len(fused))
    for relu in fused:
        annotation = relu.meta["quantization_annotation"]
        assert relu.args[0].target in CONV_OPS, f"{relu.name} follows {relu.args[0].target}"
        assert annotation.output_qspec is not None and not annotation.input_qspec_map
    for relu in set(relus) - set(fused):
        add = relu.args[0]
        assert add.target == torch.ops.aten.add.Tensor, f"{relu.name} follows {add.target}"
        assert any(a.target in CONV_OPS for a in add.args), f"{add.name} adds no conv output"
        assert "quantization_annotation" not in add.meta, f"{add.name} is annotated"


def _break_layer(model: nn.Module, layer: str, feeder: str) -> nn.Module:
    """A copy where int8 ruins ``layer`` and nothing else, and the float network barely changes.

    ``feeder``, the conv + ReLU before ``layer``, is made to output zeros on channel 0; ``layer``
    then gets a weight 100x its largest on that dead input channel. Float ignores it (it meets
    zeros), but per-channel int8 scales are set by it, so every other weight rounds to -1, 0 or
    1 step. The layer's output range stays as it was: later layers quantize as before.
    """
    broken = copy.deepcopy(model)
    conv, source = broken.get_submodule(layer), broken.get_submodule(feeder)
    with torch.no_grad():
        source.weight[0] = 0
        source.bias[0] = -1.0
        peaks = conv.weight.flatten(1).abs().amax(1)
        conv.weight[:, 0] = 0
        conv.weight[:, 0, 0, 0] = 100 * peaks
    return broken


@pytest.fixture(scope="module")
def plain_student() -> nn.Module:
    """A seeded student shaped like nota_like (no residual layers), fused: 23 convs."""
    torch.manual_seed(0)
    return fuse_for_inference(measure_batchnorm_(Wav2Lip(spec=PLAIN_SPEC)))


def test_sensitivity_ranks_a_broken_layer_first_and_keep_float_repairs_it(
    plain_student: nn.Module,
    calibration: list[tuple[torch.Tensor, torch.Tensor]],
    held_out: tuple[torch.Tensor, torch.Tensor],
) -> None:
    target = "face_encoder_blocks.3.0.conv_block.0"
    broken = _break_layer(plain_student, target, "face_encoder_blocks.2.0.conv_block.0")
    # A subset keeps the test short; the CLI and the export rank every conv.
    layers = ["audio_encoder.0.conv_block.0", "face_encoder_blocks.2.0.conv_block.0", target,
              "face_decoder_blocks.2.0.conv_block.0", "output_block.1"]
    assert set(layers) <= set(conv_layers(broken)) and len(conv_layers(broken)) == 23
    rows = layer_sensitivity(broken, calibration[:2], [held_out], layers)

    assert [row["layer"] for row in rows][0] == target, format_table(rows)
    assert rows[0]["psnr_db"] < rows[1]["psnr_db"] - 6.0, format_table(rows)
    assert {row["kind"] for row in rows} == {"conv", "conv_transpose"}
    assert most_sensitive(rows, 2) == [target, rows[1]["layer"]]
    with torch.no_grad():
        reference = broken(*held_out)
        everywhere = quantize_int8(broken, calibration[:2]).module()(*held_out)
        kept = quantize_int8(broken, calibration[:2], keep_float=[target]).module()(*held_out)
    assert reference.std() > 0.05, f"float output nearly constant (std {reference.std():.3f})"
    before, after = psnr(everywhere, reference), psnr(kept, reference)
    assert after > before + 6.0, f"keep_float {target}: {before:.2f} -> {after:.2f} dB"


def test_quantize_rejects_unfolded_model_and_empty_calibration(student: nn.Module) -> None:
    with pytest.raises(ValueError, match="fold"):
        quantize_int8(Wav2Lip(slim=0.25), [])
    with pytest.raises(ValueError, match="empty"):
        quantize_int8(student, [])


def test_save_is_atomic(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.pt2"
    target.write_bytes(b"previous export")

    def failing_save(program: ExportedProgram, path: os.PathLike[str]) -> None:
        Path(path).write_bytes(b"half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_program(load_program(saved), target)
    assert target.read_bytes() == b"previous export", "a failed save clobbered the target"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"], "temporary files left behind"


def test_psnr() -> None:
    a = torch.zeros(2, 3, 4, 4)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    assert psnr(a, a + 25.5, peak=255.0) == pytest.approx(20.0)
