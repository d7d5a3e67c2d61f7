"""Static int8 post-training quantization of a BN-folded Wav2Lip student with torchao PT2E.

Why PT2E and a project quantizer: ``torch.ao.quantization`` is deprecated in favour of torchao,
``quantize_dynamic`` leaves Conv2d untouched, and eager/FX static quantization rejects per-channel
weights for ``ConvTranspose2d``, which holds most of Wav2Lip's parameters. Of the PT2E quantizers
shipped with torchao 0.18, ``X86InductorQuantizer`` does not annotate ``conv_transpose2d`` at all,
and the deprecated, test-only ``XNNPACKQuantizer`` annotates it only when a ReLU follows directly,
with per-channel weight scales along axis 0: for a transposed conv that is the *input*-channel
axis. :class:`ConvInt8Quantizer` covers both conv kinds with per-output-channel weight scales
(axis 0 for ``conv2d``, axis 1 for ``conv_transpose2d``).

The result is a ``torch.export.ExportedProgram`` in PT2E's quantize/dequantize form: weights are
stored as int8 with float scales, every conv input is quantized per tensor, a conv-ReLU pair is
quantized as one op (its output observed after the ReLU, as int8 backends fuse it), and biases,
residual adds, concatenations and the sigmoid output stay float. The program keeps a dynamic
batch dimension and loads with ``torch`` and ``torchao`` alone.

Kernels: run eagerly the program dequantizes and computes in float (smaller, not faster). Under
``torch.compile`` with Inductor's ``freezing`` on, the QDQ conv patterns lower to oneDNN int8
convolutions (``onednn.qconv_pointwise``, ReLU fused) on x86 CPUs; see
:func:`compress.exports.compile_program`. Transposed convs have no int8 kernel there, and
Inductor's pattern would take them for plain convs, so :func:`export_int8` stores their weights
in a layout that keeps them out of it (see :func:`protect_transposed_convs`).
"""

from __future__ import annotations

import logging
import operator
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import (
    HistogramObserver,
    MinMaxObserver,
    PerChannelMinMaxObserver,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
)

from compress.metrics import psnr_db

__all__ = [
    "ConvInt8Quantizer",
    "check_keep_float",
    "export_float",
    "export_int8",
    "load_program",
    "protect_transposed_convs",
    "psnr",
    "quantize_int8",
    "save_program",
]

log = logging.getLogger(__name__)

# Weight axis holding the output channels, per aten conv op; both ops take groups at index 6.
_CONV_WEIGHT_AXIS = {
    torch.ops.aten.conv2d.default: 0,
    torch.ops.aten.conv_transpose2d.input: 1,
}
_GROUPS_ARG = 6
_RELUS = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
# Ops a QAT graph (BatchNorm not yet folded) may have between a conv and its ReLU.
_GRAPH_BATCHNORMS = (
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
    operator.getitem,
)
# Node metadata that only serves debugging; see _strip_debug_info.
_DEBUG_META = ("stack_trace", "from_node")
_OBSERVER_EPS = 2**-12
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _activation_spec() -> QuantizationSpec:
    # Post-ReLU activations are one-sided and long-tailed: the histogram observer picks the
    # clipping range that minimises quantization error instead of taking the raw min and max.
    return QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=HistogramObserver.with_args(eps=_OBSERVER_EPS),
    )


def _weight_spec(axis: int | None) -> QuantizationSpec:
    # Symmetric [-127, 127] keeps zero exact and the int8 x int8 products free of -128 overflow.
    if axis is None:
        return QuantizationSpec(
            dtype=torch.int8,
            quant_min=-127,
            quant_max=127,
            qscheme=torch.per_tensor_symmetric,
            observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=_OBSERVER_EPS),
        )
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=-127,
        quant_max=127,
        qscheme=torch.per_channel_symmetric,
        ch_axis=axis,
        observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=_OBSERVER_EPS),
    )


def _module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Strict-mode export spells paths as L['self'].a.b; non-strict as a.b.
    return path.removeprefix("L['self'].")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def check_keep_float(model: nn.Module, keep_float: Sequence[str]) -> None:
    """Raise a one-line ValueError if a ``keep_float`` path covers no conv of ``model``."""
    convs = [name for name, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    unmatched = [p for p in keep_float if not any(_under(c, p) for c in convs)]
    if unmatched:
        raise ValueError(f"keep_float paths {unmatched} match no conv of the student; use "
                         f"module names such as {convs[0]!r} or a block such as 'output_block'")


class ConvInt8Quantizer(Quantizer):
    """PT2E quantizer for conv generators: int8 convs and transposed convs, float elsewhere.

    Every ``conv2d`` and ``conv_transpose2d`` gets per-output-channel symmetric int8 weights and a
    per-tensor affine uint8 input. A conv whose only consumer is a ReLU (through BatchNorm in a
    QAT graph) forms one fused pattern: the ReLU's output is observed too, with the same spec, so
    it shares its observer with the next conv's input and an int8 backend can fuse conv, ReLU and
    requantization into one kernel. In a residual layer the add comes between the conv and the
    ReLU, so conv, add and ReLU stay apart and only the conv's input is observed. Other outputs
    are not annotated, so each activation is quantized once, where a conv reads it. Grouped
    transposed convs fall back to per-tensor weights, since their output channels do not lie
    along one weight axis.

    Args:
        keep_float: Module paths (as in ``model.named_modules()``) whose convs stay float, for
            selective quantization of sensitive layers.
    """

    def __init__(self, keep_float: Sequence[str] = ()) -> None:
        super().__init__()
        self.keep_float = tuple(keep_float)

    def annotate(self, model: GraphModule) -> GraphModule:
        """Annotate every conv node of an exported graph, except those under ``keep_float``.

        Raises:
            ValueError: If a ``keep_float`` path matches no conv, which usually means a typo.
        """
        act = _activation_spec()
        n_int8, n_fused, n_float, matched = 0, 0, 0, set[str]()
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in _CONV_WEIGHT_AXIS:
                continue
            x, weight = node.args[0], node.args[1]
            if not isinstance(x, Node) or not isinstance(weight, Node):
                continue
            path = _module_path(node)
            skipped = {p for p in self.keep_float if _under(path, p)}
            if skipped:
                matched |= skipped
                n_float += 1
                continue
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={x: act, weight: _weight_spec(self._weight_axis(node))},
                _annotated=True,
            )
            relu = _fused_relu(node)
            if relu is not None:
                relu.meta["quantization_annotation"] = QuantizationAnnotation(
                    output_qspec=act, _annotated=True
                )
                n_fused += 1
            n_int8 += 1
        unmatched = [p for p in self.keep_float if p not in matched]
        if unmatched:
            raise ValueError(
                f"keep_float paths {unmatched} match no conv; use names from named_modules()"
            )
        log.info("annotated %d convs for int8 (%d fused with their ReLU); %d kept float",
                 n_int8, n_fused, n_float)
        return model

    def validate(self, model: GraphModule) -> None:
        """Nothing to check: the graph is lowered to no particular backend's kernels."""

    @staticmethod
    def _weight_axis(node: Node) -> int | None:
        axis = _CONV_WEIGHT_AXIS[node.target]
        groups = node.args[_GROUPS_ARG] if len(node.args) > _GROUPS_ARG else 1
        return None if axis == 1 and groups != 1 else axis


def _fused_relu(conv: Node) -> Node | None:
    # Follow single-consumer edges only: a conv output that also feeds an add or a concatenation
    # is not a fusable pair.
    node = conv
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.target in _RELUS:
            return user
        if user.target not in _GRAPH_BATCHNORMS:
            return None
        node = user
    return None


def _batch_dynamic_shapes() -> tuple[dict[int, Dim], dict[int, Dim]]:
    batch = Dim("batch", min=1)
    return {0: batch}, {0: batch}


@torch.no_grad()
def quantize_int8(
    model: nn.Module,
    calibration: Iterable[tuple[Tensor, Tensor]],
    keep_float: Sequence[str] = (),
) -> ExportedProgram:
    """Quantize a BN-folded float generator to static int8 and export it with a dynamic batch.

    Args:
        model: Float generator called as ``model(audio, face)`` with BatchNorm already folded
            (see :func:`compress.fold.fold_batchnorm`); it is not modified.
        calibration: Batches of 4-D ``(audio, face)`` inputs, mel (N, 1, 80, 16) and face
            (N, 6, 96, 96), drawn from real data: random tensors give poor activation ranges.
        keep_float: Module paths whose convs stay float (see :class:`ConvInt8Quantizer`).

    Returns:
        The int8 program; run it as ``program.module()(audio, face)`` at any batch size.

    Raises:
        ValueError: If ``calibration`` is empty or the model still contains BatchNorm.
    """
    if any(isinstance(m, _BATCHNORMS) for m in model.modules()):
        raise ValueError("BatchNorm found: fold it first with compress.fold.fold_batchnorm")
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("calibration is empty: pass at least one (audio, face) batch")
    example = _two_sample_example(first)
    graph = _export(model, example)

    prepared = prepare_pt2e(graph.module(), ConvInt8Quantizer(keep_float))
    n_batches = 0
    for audio, face in _chain(first, batches):
        prepared(audio, face)
        n_batches += 1
    log.info("calibrated int8 observers on %d batches", n_batches)

    return export_int8(convert_pt2e(prepared), example)


@torch.no_grad()
def export_int8(converted: GraphModule, example: tuple[Tensor, ...]) -> ExportedProgram:
    """Export the output of ``convert_pt2e`` as a compact, compilable int8 program.

    Drops the float weights ``convert_pt2e`` leaves behind, applies
    :func:`protect_transposed_convs` and exports with a dynamic batch dimension. PTQ
    (:func:`quantize_int8`) and QAT share this last step, so their files have the same layout.

    Args:
        converted: A PT2E graph after ``convert_pt2e``; it is modified in place.
        example: One ``(audio, face)`` batch; only its sample shapes matter.
    """
    _drop_unused_tensors(converted)
    protect_transposed_convs(converted)
    program = _export(converted, _two_sample_example(example))
    log.info("int8 program tensors: %s", _storage_summary(program))
    return program


# TODO(issue 6): no int8 transposed-conv kernel under Inductor; the decoder's transposed convs
# run as dequantized weights + float oneDNN deconvolution (an exact sub-pixel rewrite into
# plain convs would let them use qconv too).
def protect_transposed_convs(gm: GraphModule) -> int:
    """Keep per-channel int8 transposed convs away from Inductor's int8 conv lowering.

    Inductor's x86 freezing pass (torch 2.11 and torchao 0.18 alike) matches
    ``convolution(dequant(x), dequant_per_channel(w))`` without checking the transposed flag and
    prepacks the ``(in, out, kH, kW)`` transposed weight as a plain conv's ``(out, in, kH, kW)``:
    compilation fails, or computes another layer. So the int8 weight is stored transposed,
    ``(out, in, kH, kW)`` with scales on axis 0, and a ``permute`` after the dequantize restores
    the layout. The int8 values and scales, and so the eager output, are unchanged.

    Returns:
        The number of transposed convs rewritten.
    """
    aten, decomposed = torch.ops.aten, torch.ops.quantized_decomposed
    count = 0
    for node in list(gm.graph.nodes):
        if node.target != aten.conv_transpose2d.input:
            continue
        dequant = node.args[1]
        if not (isinstance(dequant, Node)
                and dequant.target == decomposed.dequantize_per_channel.default
                and dequant.args[3] == 1 and dequant.args[0].op == "get_attr"
                and "." not in dequant.args[0].target):
            continue
        name = dequant.args[0].target
        weight = getattr(gm, name)
        setattr(gm, name, weight.transpose(0, 1).contiguous())
        dequant.update_arg(3, 0)
        with gm.graph.inserting_after(dequant):
            restored = gm.graph.call_function(aten.permute.default, (dequant, [1, 0, 2, 3]))
        node.replace_input_with(dequant, restored)
        count += 1
    gm.graph.lint()
    gm.recompile()
    log.info("stored %d transposed-conv int8 weights out of Inductor's qconv pattern", count)
    return count


@torch.no_grad()
def export_float(model: nn.Module, example: tuple[Tensor, Tensor]) -> ExportedProgram:
    """Export a float generator with a dynamic batch, as the baseline beside its int8 program.

    Args:
        model: Generator called as ``model(audio, face)``; it is not modified.
        example: One 4-D ``(audio, face)`` batch; only its sample shapes matter.
    """
    return _export(model, _two_sample_example(example))


def _two_sample_example(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
    # An example batch of one would let export specialise the batch size, so trace two samples.
    return tuple(t[:1].expand(2, *t.shape[1:]).clone() for t in batch)


def _export(model: nn.Module, example: tuple[Tensor, ...]) -> ExportedProgram:
    # PT2E graph modules refuse train()/eval(); they are traced in eval mode already.
    toggle = not isinstance(model, GraphModule) and model.training
    if toggle:
        model.eval()
    try:
        program = torch.export.export(model, example, dynamic_shapes=_batch_dynamic_shapes())
    finally:
        if toggle:
            model.train()
    _strip_debug_info(program)
    return program


def _chain(
    first: tuple[Tensor, Tensor], rest: Iterator[tuple[Tensor, Tensor]]
) -> Iterator[tuple[Tensor, Tensor]]:
    yield first
    yield from rest


def _drop_unused_tensors(gm: GraphModule) -> None:
    # convert_pt2e reads the int8 weights from new attributes but leaves the float originals
    # registered, and export would save both: a file larger than the float model.
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in used:
            owner_name, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_name)
            owner._parameters.pop(attr, None)
            owner._buffers.pop(attr, None)


def _strip_debug_info(program: ExportedProgram) -> None:
    # Export keeps its example inputs, the exporting machine's Python stack traces and pass
    # provenance. None of it is needed to run the program, and for a small student it is a fifth
    # of the saved file, a third as much as the int8 weights themselves.
    program.example_inputs = None
    for node in program.graph.nodes:
        for key in _DEBUG_META:
            node.meta.pop(key, None)


def _storage_summary(program: ExportedProgram) -> str:
    nbytes: dict[str, int] = {}
    for t in [*program.state_dict.values(), *program.constants.values()]:
        if isinstance(t, Tensor):
            key = str(t.dtype).removeprefix("torch.")
            nbytes[key] = nbytes.get(key, 0) + t.numel() * t.element_size()
    return ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(nbytes.items()))


def save_program(program: ExportedProgram, path: str | os.PathLike[str]) -> None:
    """Write an exported program atomically: a failed save never leaves a partial file at path."""
    target = Path(path)
    # Save under the final name in a sibling temporary folder, because the archive's inner folder
    # is named after the file; a rename within one file system is atomic.
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp_dir:
        tmp = Path(tmp_dir) / target.name
        torch.export.save(program, tmp)
        os.replace(tmp, target)


def load_program(path: str | os.PathLike[str]) -> ExportedProgram:
    """Load a program written by :func:`save_program`.

    An int8 program needs ``torchao`` imported first: importing it registers the
    ``quantized_decomposed`` ops that the graph calls. This module imports it.
    """
    return torch.export.load(path)


def psnr(a: Tensor, b: Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images or batches; inf when identical."""
    return float(psnr_db(a, b, peak))
