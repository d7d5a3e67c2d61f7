"""ONNX exports run by ONNX Runtime: fidelity to the float student, int8 storage, atomic writes."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from compress import onnx_export
from compress.benchmark import image_like, load_preset
from compress.onnx_export import export_onnx, quantize_onnx_int8
from compress.quantize import psnr

BATCHES = (1, 7, 128)
MIN_FP32_PSNR_DB = 60.0
MIN_INT8_PSNR_DB = 35.0
# nota_like: no residual layers, so its 23 convs are 17 Conv and 6 ConvTranspose.
N_CONV, N_CONVT = 17, 6


@pytest.fixture(scope="module")
def student() -> nn.Module:
    """The nota_like student, seeded, with BatchNorm statistics of its own activations.

    Default statistics (mean 0, var 1) shrink activations layer by layer until the output is
    almost constant, which any quantizer reproduces; measured statistics keep every layer busy,
    like a trained network. BatchNorm is left unfolded: the export must fold it.
    """
    torch.manual_seed(0)
    model = load_preset("nota_like")
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None  # cumulative average: running stats become the batch stats
    model.train()
    with torch.no_grad():
        model(*image_like(16, torch.Generator().manual_seed(1)))
    return model.eval()


@pytest.fixture(scope="module")
def paths(student: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    example = image_like(2, torch.Generator().manual_seed(2))
    fp32 = export_onnx(student, example, folder / "student_fp32.onnx")
    generator = torch.Generator().manual_seed(3)
    calibration = [image_like(8, generator) for _ in range(4)]
    int8 = quantize_onnx_int8(fp32, calibration, folder / "student_int8.onnx")
    return fp32, int8


def _run(path: Path, audio: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(["frames"], {"audio": audio.numpy(), "face": face.numpy()})[0]
    return torch.from_numpy(out)


@pytest.mark.parametrize("batch", BATCHES)
def test_onnx_runtime_matches_float_student(
    student: nn.Module, paths: tuple[Path, Path], batch: int
) -> None:
    audio, face = image_like(batch, torch.Generator().manual_seed(100 + batch))
    with torch.no_grad():
        reference = student(audio, face)
    assert reference.std() > 0.05, f"float output nearly constant (std {reference.std():.3f})"
    fp32, int8 = (_run(p, audio, face) for p in paths)
    assert fp32.shape == int8.shape == (batch, 3, 96, 96), (fp32.shape, int8.shape)
    fp32_db, int8_db = psnr(fp32, reference), psnr(int8, reference)
    print(f"batch {batch}: ONNX fp32 {fp32_db:.2f} dB, ONNX int8 {int8_db:.2f} dB vs float")
    assert fp32_db >= MIN_FP32_PSNR_DB, f"batch {batch}: ONNX fp32 PSNR {fp32_db:.2f} dB"
    assert int8_db >= MIN_INT8_PSNR_DB, f"batch {batch}: ONNX int8 PSNR {int8_db:.2f} dB"


def test_interface_has_named_inputs_and_dynamic_batch(paths: tuple[Path, Path]) -> None:
    for path in paths:
        graph = onnx.load(path).graph
        shapes = {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]
        }
        batch = shapes["audio"][0]
        assert isinstance(batch, str) and batch, f"{path.name}: fixed batch {shapes}"
        assert shapes == {"audio": [batch, 1, 80, 16], "face": [batch, 6, 96, 96],
                          "frames": [batch, 3, 96, 96]}, f"{path.name}: {shapes}"


def test_batchnorm_is_folded(paths: tuple[Path, Path]) -> None:
    ops = Counter(node.op_type for node in onnx.load(paths[0]).graph.node)
    assert ops["BatchNormalization"] == 0, ops
    assert (ops["Conv"], ops["ConvTranspose"]) == (N_CONV, N_CONVT), ops


def test_int8_model_stores_int8_weights_per_output_channel(
    student: nn.Module, paths: tuple[Path, Path]
) -> None:
    graph = onnx.load(paths[1]).graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert Counter(n.op_type for n in convs) == {"Conv": N_CONV, "ConvTranspose": N_CONVT}
    for conv in convs:
        dequant = producers[conv.input[1]]
        assert dequant.op_type == "DequantizeLinear", f"{conv.name}: weight from {dequant.op_type}"
        weight = initializers[dequant.input[0]]
        assert weight.data_type == onnx.TensorProto.INT8, (
            f"{conv.name}: weight stored as {onnx.TensorProto.DataType.Name(weight.data_type)}")
        axis = next((a.i for a in dequant.attribute if a.name == "axis"), 1)
        # Output channels: Conv weights are (out, in, kH, kW), ConvTranspose (in, out, kH, kW).
        expected_axis = 0 if conv.op_type == "Conv" else 1
        assert axis == expected_axis, f"{conv.name}: per-channel axis {axis}"
        scale = numpy_helper.to_array(initializers[dequant.input[1]])
        assert scale.shape == (weight.dims[axis],), f"{conv.name}: scales {scale.shape}"
    float_weights = [t.name for t in graph.initializer
                     if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4]
    assert not float_weights, f"float conv weights still stored: {float_weights}"
    size_ratio = paths[1].stat().st_size / paths[0].stat().st_size
    print(f"{len(convs)} convs with int8 per-channel weights; file {size_ratio:.2f}x the fp32")
    assert size_ratio < 0.35, f"int8 file is {size_ratio:.2f}x the fp32 file"


def test_writes_are_atomic(
    paths: tuple[Path, Path], student: nn.Module, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")

    def half_written(_: object, path: object, *args: object, **kwargs: object) -> None:
        Path(path).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", half_written)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(student, image_like(2, torch.Generator()), target)
    monkeypatch.setattr(onnx_export, "quantize_static", half_written)
    with pytest.raises(OSError, match="disk full"):
        quantize_onnx_int8(paths[0], [image_like(2, torch.Generator())], target)
    assert target.read_bytes() == b"previous export", "a failed write clobbered the target"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"], "temporary files left"


def test_files_get_the_usual_permissions(paths: tuple[Path, Path]) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        mode = path.stat().st_mode
        assert mode & 0o777 == 0o666 & ~umask, f"{path.name}: {mode:o}"


def test_quantize_rejects_empty_calibration(paths: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="calibration is empty"):
        quantize_onnx_int8(paths[0], [], tmp_path / "int8.onnx")
    assert not list(tmp_path.iterdir())


def test_reader_feeds_float32_numpy() -> None:
    reader = onnx_export._Reader([(torch.zeros(2, 1, 80, 16, dtype=torch.float64),
                                   np.ones((2, 6, 96, 96), dtype=np.float16))])
    feed = reader.get_next()
    assert feed is not None and sorted(feed) == ["audio", "face"]
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in feed.values())
    assert reader.get_next() is None and reader.batches == 1
