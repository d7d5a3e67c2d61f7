"""ONNX exports of a Wav2Lip generator for ONNX Runtime: float32, and static int8 in QDQ form.

Why BatchNorm is folded here, in PyTorch: the ONNX Runtime graph optimizer folds BatchNorm into a
preceding ``Conv`` but not into a ``ConvTranspose`` (onnxruntime#14270), and Wav2Lip's decoder is
made of ``ConvTranspose`` + BatchNorm pairs. Folding first also means the int8 weight scales are
computed on the weights that actually run.

The graph comes from the ``torch.export``-based exporter (``dynamo=True``) with a dynamic batch
dimension named ``batch`` on the inputs ``audio`` (N, 1, 80, 16) and ``face`` (N, 6, 96, 96) and
on the output ``frames`` (N, 3, 96, 96). A fixed batch broke the original Wav2Lip's last, smaller
batch when users exported it with the legacy exporter.

int8 uses ``onnxruntime.quantization.quantize_static`` in QDQ format: symmetric int8 weights per
output channel, uint8 activations calibrated on given batches (uint8 activations with int8
weights are ORT's advice for x86 CPUs with VNNI). Since onnxruntime PR #19996 (1.18) the QDQ conv
quantizer takes the per-channel weight axis of ``ConvTranspose`` as 1, its output-channel axis
(weights are laid out (in, out, kH, kW)); :func:`quantize_onnx_int8` sets that axis explicitly
too, so the choice does not rest on a default.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from torch import Tensor, nn

from compress.fold import fold_batchnorm

__all__ = ["INPUT_NAMES", "OUTPUT_NAME", "export_onnx", "quantize_onnx_int8"]

log = logging.getLogger(__name__)

INPUT_NAMES = ("audio", "face")
OUTPUT_NAME = "frames"
# Output-channel axis of the weight, per ONNX op: Conv (out, in, kH, kW), ConvTranspose
# (in, out, kH, kW).
_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}


def export_onnx(
    model: nn.Module, example: tuple[Tensor, Tensor], path: str | os.PathLike[str]
) -> Path:
    """Fold BatchNorm, export ``model`` to a float32 ONNX file with a dynamic batch; returns path.

    Args:
        model: Float generator called as ``model(audio, face)``; it is not modified (BatchNorm is
            folded in a copy, see :func:`compress.fold.fold_batchnorm`).
        example: One 4-D ``(audio, face)`` batch; only its sample shapes matter.
        path: Target file, written atomically (a failed export leaves no file there).
    """
    folded = fold_batchnorm(model).float()
    # Two samples: an example batch of one would let export specialise the batch size.
    inputs = tuple(t[:1].detach().float().expand(2, *t.shape[1:]).contiguous() for t in example)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(
            folded,
            inputs,
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes={name: {0: batch} for name in INPUT_NAMES},
        )
    proto = program.model_proto
    _check_dynamic_batch(proto)
    target = Path(path)
    with _atomic_target(target) as tmp:
        onnx.save_model(proto, tmp)
    log.info("wrote float32 ONNX model %s (%.2f MB)", target, target.stat().st_size / 1e6)
    return target


def quantize_onnx_int8(
    fp32_path: str | os.PathLike[str],
    calibration: Iterable[tuple[Tensor, Tensor]],
    path: str | os.PathLike[str],
) -> Path:
    """Quantize a float ONNX model from :func:`export_onnx` to static int8 QDQ; returns ``path``.

    Args:
        fp32_path: Float32 model with inputs ``audio`` and ``face``.
        calibration: Batches of 4-D ``(audio, face)`` inputs from real data; activation ranges
            are their min and max (random inputs give poor ranges).
        path: Target file, written atomically.

    Raises:
        ValueError: If ``calibration`` yields no batch.
    """
    fp32_path, target = Path(fp32_path), Path(path)
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("calibration is empty: pass at least one (audio, face) batch")
    reader = _Reader(itertools.chain([first], batches))
    axes = _per_channel_axes(onnx.load(fp32_path, load_external_data=False))
    with _atomic_target(target) as tmp:
        quantize_static(
            fp32_path,
            tmp,
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "QDQOpTypePerChannelSupportToAxis": axes},
        )
    log.info("wrote int8 QDQ ONNX model %s (%.2f MB), calibrated on %d batches", target,
             target.stat().st_size / 1e6, reader.batches)
    return target


class _Reader(CalibrationDataReader):
    """Feeds ``(audio, face)`` batches to ORT's calibrator as ``{"audio": ..., "face": ...}``."""

    def __init__(self, batches: Iterable[tuple[Tensor, Tensor]]) -> None:
        self._batches: Iterator[tuple[Tensor, Tensor]] = iter(batches)
        self.batches = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        pair = next(self._batches, None)
        if pair is None:
            return None
        self.batches += 1
        return {name: _numpy(t) for name, t in zip(INPUT_NAMES, pair)}


def _numpy(t: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, Tensor):
        t = t.detach().float().cpu().numpy()
    return np.ascontiguousarray(t, dtype=np.float32)


def _per_channel_axes(proto: onnx.ModelProto) -> dict[str, int]:
    ops = {node.op_type for node in proto.graph.node}
    return {op: axis for op, axis in _WEIGHT_AXIS.items() if op in ops}


def _check_dynamic_batch(proto: onnx.ModelProto) -> None:
    for value in [*proto.graph.input, *proto.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.dim_param:
            raise RuntimeError(f"ONNX {value.name!r} has a fixed batch {dim.dim_value}; the "
                               "exporter ignored dynamic_shapes")


@contextmanager
def _atomic_target(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; move it onto ``target`` only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    # mkstemp makes the file private (0600); the export gets the permissions of any new file.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
