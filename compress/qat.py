"""Quantization-aware training (QAT) of a Wav2Lip student with torchao's PT2E flow.

The student is traced with ``torch.export`` in train mode, with a dynamic batch and the tapped
features as extra outputs, then prepared with ``prepare_qat_pt2e`` and the project's
:class:`~compress.quantize.ConvInt8Quantizer` (observers swapped for fake quantizers). The PT2E
QAT flow rewrites every conv/transposed-conv + BatchNorm pair so that the weight is fake-quantized
after scaling by the BatchNorm, as it will be once folded; ``convert_pt2e`` folds it for real.

:class:`QATStudent` puts the prepared graph behind the student's interface (``forward``,
``forward_with_features``, ``spec``, ``slim``, ``decoder_widths``) and owns the three switches
of a QAT schedule: fake quantization, observers, and frozen BatchNorm statistics. Parameter and
BatchNorm buffer names inside the graph are the student's own (under ``student.``), which is
what lets :meth:`QATStudent.to_float` hand back a plain :class:`~models.wav2lip.Wav2Lip`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram
from torch.fx import GraphModule
from torchao.quantization.pt2e import (
    FakeQuantize,
    FakeQuantizeBase,
    HistogramObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    move_exported_model_to_eval,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationSpec

from compress.quantize import ConvInt8Quantizer, protect_transposed_convs
from models.spec import StudentSpec
from models.wav2lip import IMG_SIZE, Wav2Lip

__all__ = ["QATConvInt8Quantizer", "QATStudent", "convert_qat", "prepare_qat"]

log = logging.getLogger(__name__)

# Attribute under which the traced wrapper holds the student: graph names start with it.
STUDENT_ATTR = "student"
MEL_SHAPE = (1, 80, 16)
FACE_SHAPE = (6, IMG_SIZE, IMG_SIZE)
_FAKE_QUANT_EPS = 2**-12
_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)
# Training-capable BatchNorm ops of an exported graph; argument 5 is the `training` flag.
_BATCHNORM_OPS = (
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten.cudnn_batch_norm.default,
)
_BN_TRAINING_ARG = 5


def _fake_quant_spec(spec: QuantizationSpec, weight: bool) -> QuantizationSpec:
    # Activations: a moving average of min/max, the usual QAT estimate (a histogram is too slow
    # to run every step). Weights: the current min/max (averaging constant 1); they are known
    # exactly at each step, and an average would lag weights that BatchNorm rescales as its
    # running statistics move.
    kwargs: dict[str, object] = {"averaging_constant": 1.0} if weight else {}
    if spec.qscheme in _PER_CHANNEL:
        observer = MovingAveragePerChannelMinMaxObserver
        # torchao's prepare passes the spec's ch_axis only to classes named "PerChannel...",
        # so a FakeQuantize would fall back to axis 0: a transposed conv's input channels.
        kwargs["ch_axis"] = spec.ch_axis
    else:
        observer = MovingAverageMinMaxObserver
    ctr = FakeQuantize.with_args(observer=observer, eps=_FAKE_QUANT_EPS, **kwargs)
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=ctr)


class QATConvInt8Quantizer(ConvInt8Quantizer):
    """:class:`ConvInt8Quantizer` with fake quantizers in place of observers, for QAT.

    The annotation (which tensors, dtypes, ranges, channel axes) is the post-training one, so
    the QAT program quantizes exactly what :func:`compress.quantize.quantize_int8` does. Shared,
    derived and fixed specs are left as they are.
    """

    def annotate(self, model: GraphModule) -> GraphModule:
        """Annotate as the parent does, then make every observing spec fake-quantize."""
        super().annotate(model)
        for node in model.graph.nodes:
            annotation = node.meta.get("quantization_annotation")
            if annotation is None:
                continue
            annotation.input_qspec_map = {
                # Parameters enter an exported graph as get_attr nodes.
                arg: _fake_quant_spec(spec, weight=arg.op == "get_attr")
                if isinstance(spec, QuantizationSpec) else spec
                for arg, spec in annotation.input_qspec_map.items()
            }
            if isinstance(annotation.output_qspec, QuantizationSpec):
                annotation.output_qspec = _fake_quant_spec(annotation.output_qspec, weight=False)
        return model


class _Tapped(nn.Module):
    """What gets traced: 4-D inputs to ``(output, {tap: feature})``."""

    def __init__(self, student: Wav2Lip, taps: tuple[Hashable, ...]) -> None:
        super().__init__()
        setattr(self, STUDENT_ATTR, student)
        self.taps = taps

    def forward(self, audio: Tensor, face: Tensor) -> tuple[Tensor, dict[Hashable, Tensor]]:
        return getattr(self, STUDENT_ATTR).forward_with_features(audio, face, self.taps)


class _OutputOnly(nn.Module):
    """The converted graph without its feature outputs: what a deployed program returns."""

    def __init__(self, converted: GraphModule) -> None:
        super().__init__()
        # Not `graph`: the exported program's root GraphModule already has that attribute.
        self.converted = converted

    def forward(self, audio: Tensor, face: Tensor) -> Tensor:
        return self.converted(audio, face)[0]


def _batch_dynamic_shapes() -> tuple[dict[int, Dim], dict[int, Dim]]:
    batch = Dim("batch", min=1)
    return {0: batch}, {0: batch}


def _example(device: torch.device) -> tuple[Tensor, Tensor]:
    # Two samples, so that export cannot specialise the batch size to 1; values do not matter.
    return torch.zeros(2, *MEL_SHAPE, device=device), torch.zeros(2, *FACE_SHAPE, device=device)


def _set_batchnorm_training(graph: GraphModule, training: bool) -> None:
    # An exported graph ignores .train()/.eval(): BatchNorm's mode is an argument of its op.
    # Flipping it in place keeps each layer's momentum and eps (torchao's pattern rewrite in
    # move_exported_model_to_eval/train substitutes the defaults) and takes milliseconds.
    # The num_batches_tracked increment is a separate op and keeps counting; with a momentum
    # set, as in Wav2Lip, nothing reads it.
    changed = 0
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target in _BATCHNORM_OPS:
            if node.args[_BN_TRAINING_ARG] != training:
                args = list(node.args)
                args[_BN_TRAINING_ARG] = training
                node.args = tuple(args)
                changed += 1
    if changed:
        graph.recompile()


def _set_fake_quant(graph: GraphModule, fake_quant: bool, observe: bool) -> None:
    for module in graph.modules():
        if isinstance(module, FakeQuantizeBase):
            module.enable_fake_quant(fake_quant)
            module.enable_observer(observe)


class QATStudent(nn.Module):
    """A PT2E-prepared student behind the :class:`~models.wav2lip.Wav2Lip` interface.

    Build it with :func:`prepare_qat`. Fake quantization and observers start disabled, so it
    trains as the float student until :meth:`set_phase` switches them on. The graph's train/eval
    behaviour follows ``self.training`` at each call, however the flag was set (Lightning restores
    it after validation by assigning ``training`` on every submodule, without calling ``train``).
    Observers only run in training mode.
    """

    def __init__(
        self,
        graph: GraphModule,
        spec: StudentSpec,
        taps: tuple[Hashable, ...],
        decoder_widths: Sequence[int],
        feature_widths: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.prepared = graph
        self.spec = spec
        self.slim = spec.slim
        self.taps = taps
        self._decoder_widths = list(decoder_widths)
        self._feature_widths = dict(feature_widths or {})
        self.fake_quant = False
        self.observing = False
        self.bn_frozen = False
        # (BatchNorm training, observers on) as last written into the graph.
        self._applied: tuple[bool, bool] | None = None

    def set_phase(self, fake_quant: bool, observe: bool, freeze_bn: bool) -> None:
        """Set the QAT switches; they take effect at the next forward."""
        self.fake_quant, self.observing, self.bn_frozen = fake_quant, observe, freeze_bn
        self._applied = None

    def train(self, mode: bool = True) -> QATStudent:
        """Set the mode flag on every submodule (PT2E graphs refuse ``train()`` itself)."""
        for module in self.modules():
            module.training = mode
        return self

    def _sync_mode(self) -> None:
        state = (self.training and not self.bn_frozen, self.training and self.observing)
        if state != self._applied:
            _set_batchnorm_training(self.prepared, state[0])
            _set_fake_quant(self.prepared, self.fake_quant, state[1])
            self._applied = state

    def forward(self, audio: Tensor, face: Tensor) -> Tensor:
        return self.forward_with_features(audio, face)[0]

    def forward_with_features(
        self, audio: Tensor, face: Tensor, taps: Sequence[Hashable] = ()
    ) -> tuple[Tensor, dict[Hashable, Tensor]]:
        """As :meth:`Wav2Lip.forward_with_features`, for the taps chosen at preparation.

        Raises:
            ValueError: If a tap was not traced by :func:`prepare_qat`.
        """
        missing = [t for t in taps if t not in self.taps]
        if missing:
            raise ValueError(f"taps {missing} were not traced at QAT preparation (traced: "
                             f"{list(self.taps)}); prepare with every tap the loss uses")
        self._sync_mode()
        windowed = face.dim() > 4
        if windowed:
            # Same time-major flattening as Wav2Lip.forward_with_features.
            batch, steps = audio.shape[:2]
            audio = audio.transpose(0, 1).flatten(0, 1)
            face = face.permute(2, 0, 1, 3, 4).flatten(0, 1)
        out, features = self.prepared(audio, face)
        if windowed:
            out = out.unflatten(0, (steps, batch)).permute(1, 2, 0, 3, 4)
        return out, {t: features[t] for t in taps}

    def _activation_quantizers(self) -> dict[str, FakeQuantize]:
        # Weights are quantized symmetrically (ConvInt8Quantizer); activations per tensor, affine.
        return {name: m for name, m in self.prepared.named_modules()
                if isinstance(m, FakeQuantize) and m.qscheme == torch.per_tensor_affine}

    @torch.no_grad()
    def calibrate_activations(
        self, batches: Iterable[tuple[Tensor, Tensor]]
    ) -> dict[str, tuple[float, float]]:
        """Set each activation range from a histogram of ``batches``, as PTQ calibration would.

        QAT's moving min/max keeps every outlier in range; the histogram observer of
        :func:`compress.quantize.quantize_int8` picks the range of least quantization error
        instead. The network runs as float (BatchNorm on its running statistics, fake
        quantization off) while the histograms fill, as in post-training calibration; the
        weight quantizers observe the current weights in the same passes.

        Returns:
            ``{quantizer: (min, max)}``, for :meth:`set_activation_ranges` on other ranks.
        """
        quantizers = self._activation_quantizers()
        histograms = {fq: HistogramObserver(dtype=fq.dtype, qscheme=fq.qscheme,
                                            quant_min=fq.quant_min, quant_max=fq.quant_max,
                                            eps=_FAKE_QUANT_EPS).to(fq.scale.device)
                      for fq in quantizers.values()}
        hooks = [fq.register_forward_pre_hook(lambda module, args: histograms[module](args[0]))
                 for fq in quantizers.values()]
        _set_batchnorm_training(self.prepared, False)
        _set_fake_quant(self.prepared, fake_quant=False, observe=False)
        # Weight ranges are observed too: with the observers frozen from QAT's first step on,
        # nothing else would ever set them.
        for module in self.prepared.modules():
            if isinstance(module, FakeQuantizeBase) and module not in histograms:
                module.enable_observer(True)
        try:
            for audio, face in batches:
                self.prepared(audio, face)
        finally:
            for hook in hooks:
                hook.remove()
            self._applied = None  # the next forward writes the schedule's switches back
        ranges = {}
        for name, fq in quantizers.items():
            scale, zero_point = histograms[fq].calculate_qparams()
            scale, zero_point = float(scale), int(zero_point)
            ranges[name] = ((fq.quant_min - zero_point) * scale,
                            (fq.quant_max - zero_point) * scale)
        self.set_activation_ranges(ranges)
        return ranges

    @torch.no_grad()
    def set_activation_ranges(self, ranges: Mapping[str, tuple[float, float]]) -> None:
        """Give activation quantizers these ``(min, max)`` ranges, observer state included.

        The observer's min and max are set too, since a later observation step and
        ``convert_pt2e`` both derive the scale from them.
        """
        quantizers = self._activation_quantizers()
        if set(ranges) != set(quantizers):
            raise ValueError(f"ranges name {len(ranges)} quantizers, the graph has "
                             f"{len(quantizers)}")
        for name, (low, high) in ranges.items():
            fq = quantizers[name]
            observer = fq.activation_post_process
            observer.min_val.resize_(()).fill_(low)
            observer.max_val.resize_(()).fill_(high)
            scale, zero_point = observer.calculate_qparams()
            fq.scale.resize_(scale.shape).copy_(scale)
            fq.zero_point.resize_(zero_point.shape).copy_(zero_point)

    def decoder_widths(self) -> list[int]:
        """Output channels of each decoder block, as the float student reports them."""
        return list(self._decoder_widths)

    def feature_widths(self) -> dict[str, int]:
        """Channels of every tappable feature, as the float student reports them."""
        return dict(self._feature_widths)

    def float_state_dict(self) -> dict[str, Tensor]:
        """The student's weights and BatchNorm statistics under the float student's names."""
        prefix = STUDENT_ATTR + "."
        return {k.removeprefix(prefix): v for k, v in self.prepared.state_dict().items()
                if k.startswith(prefix)}

    @torch.no_grad()
    def load_float_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy a float student's state dict into the graph, e.g. from a pre-QAT checkpoint.

        Raises:
            ValueError: If the keys are not exactly the student's.
        """
        target = {f"{STUDENT_ATTR}.{k}": v for k, v in state.items()}
        own = {k for k in self.prepared.state_dict() if k.startswith(STUDENT_ATTR + ".")}
        if set(target) != own:
            diff = sorted(set(target) ^ own)
            raise ValueError(f"float weights do not fit the QAT student: {len(diff)} keys differ, "
                             f"first {diff[:3]}")
        self.prepared.load_state_dict(target, strict=False)

    @torch.no_grad()
    def fake_quantized_weights(self) -> dict[str, Tensor]:
        """Each fake-quantized conv weight as the forward pass uses it, under the student's names.

        A weight ``w`` followed by BatchNorm runs as ``fq(w * s) / s`` with ``s`` the BatchNorm
        scale (``gamma / sqrt(running_var + eps)``), a weight without one as ``fq(w)``. Once the
        observers freeze, the trained (latent) weights can leave the frozen ranges, where the
        fake quantizer clamps them: the network that was trained, and that becomes the int8
        program, is the one with these weights, not the latent ones.
        """
        modules = dict(self.prepared.named_modules())
        prefix = STUDENT_ATTR + "."
        weights: dict[str, Tensor] = {}
        for node in self.prepared.graph.nodes:
            if node.op != "get_attr" or not node.target.startswith(prefix):
                continue
            [user] = node.users if len(node.users) == 1 else [None]
            if user is None:
                continue
            scaled = user.op == "call_function" and user.target == torch.ops.aten.mul.Tensor
            fq_node = next(iter(user.users)) if scaled and len(user.users) == 1 else user
            fake_quant = modules.get(fq_node.target) if fq_node.op == "call_module" else None
            if not isinstance(fake_quant, FakeQuantizeBase):
                continue
            weight = _evaluate(self.prepared, node)
            flags = (fake_quant.fake_quant_enabled.clone(), fake_quant.observer_enabled.clone())
            fake_quant.enable_fake_quant(True)
            fake_quant.enable_observer(False)
            try:
                if scaled:
                    scale = _evaluate(self.prepared, user.args[1])
                    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
                    quantized = torch.where(scale == 0, weight, fake_quant(weight * safe) / safe)
                else:
                    quantized = fake_quant(weight)
            finally:
                fake_quant.fake_quant_enabled.copy_(flags[0])
                fake_quant.observer_enabled.copy_(flags[1])
            weights[node.target.removeprefix(prefix)] = quantized.detach().clone()
        return weights

    def to_float(self) -> Wav2Lip:
        """A plain float :class:`Wav2Lip` (same spec, same device) holding the trained weights.

        With fake quantization on, its conv weights are :meth:`fake_quantized_weights`: the
        float network then computes what the QAT network computed, activations unquantized.
        """
        state = self.float_state_dict()
        if self.fake_quant:
            state.update(self.fake_quantized_weights())
        student = Wav2Lip(spec=self.spec)
        student.load_state_dict(state, strict=True)
        device = next(self.prepared.parameters()).device
        return student.to(device).train(self.training)


def _evaluate(graph: GraphModule, node: torch.fx.Node) -> Tensor:
    """Value of a node computed from attributes only (a weight, a BatchNorm scale)."""
    if node.op == "get_attr":
        value = graph
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    if node.op != "call_function":
        raise ValueError(f"{node.name} ({node.op}) depends on the inputs, not only on weights")
    args, kwargs = torch.fx.node.map_arg(
        (node.args, node.kwargs), lambda arg: _evaluate(graph, arg)
    )
    return node.target(*args, **kwargs)


def prepare_qat(
    student: Wav2Lip, taps: Sequence[Hashable] = (), keep_float: Sequence[str] = ()
) -> QATStudent:
    """Trace ``student`` in train mode and prepare it for QAT, fake quantization switched off.

    Args:
        student: Float student; its weights and BatchNorm statistics are copied, not shared.
        taps: Feature taps the distillation loss will ask for (any keys the student accepts).
        keep_float: Student module paths whose convs stay float (see ``ConvInt8Quantizer``).

    Returns:
        The prepared student, in training mode, on ``student``'s device.
    """
    taps = tuple(taps)
    device = next(student.parameters()).device
    # Trace a copy: export must see train-mode BatchNorm, and the caller's module stays intact.
    traced = _Tapped(copy.deepcopy(student).train(), taps)
    program = torch.export.export(traced, _example(device), dynamic_shapes=_batch_dynamic_shapes())
    quantizer = QATConvInt8Quantizer([f"{STUDENT_ATTR}.{p}" for p in keep_float])
    graph = prepare_qat_pt2e(program.module(), quantizer)
    widths = student.feature_widths() if hasattr(student, "feature_widths") else None
    prepared = QATStudent(graph, student.spec, taps, student.decoder_widths(), widths)
    n_fq = sum(isinstance(m, FakeQuantizeBase) for m in graph.modules())
    log.info("prepared the student for QAT: %d fake quantizers, taps %s", n_fq, list(taps))
    return prepared.train()


@torch.no_grad()
def convert_qat(student: QATStudent) -> ExportedProgram:
    """Convert a QAT student to int8 and export it in the layout of ``quantize_int8``'s program.

    Conv + BatchNorm pairs are folded, weights stored as int8 with the scales learned in QAT,
    activations quantized per tensor where the quantizer put them, transposed-conv weights kept
    away from Inductor's int8 conv lowering (``protect_transposed_convs``); the result takes 4-D
    inputs at any batch size, returns the image only and lives on the CPU. ``student`` is not
    modified.
    """
    # On the CPU: the program is a deployment file, loadable where there is no GPU.
    graph = copy.deepcopy(student.prepared).cpu()
    _set_batchnorm_training(graph, False)
    # BatchNorm is in eval form already; this switches any other train-only op (dropout).
    graph = move_exported_model_to_eval(graph)
    _set_fake_quant(graph, fake_quant=True, observe=False)
    converted = convert_pt2e(graph)
    # The rest of compress.quantize.export_int8, which cannot take this graph as is: it would
    # export the feature outputs too.
    _drop_unused_tensors(converted)
    protect_transposed_convs(converted)
    program = torch.export.export(_OutputOnly(converted), _example(torch.device("cpu")),
                                  dynamic_shapes=_batch_dynamic_shapes())
    _strip_debug_info(program)
    return program


def _drop_unused_tensors(graph: GraphModule) -> None:
    # convert_pt2e reads the folded int8 weights from new attributes and leaves the float
    # originals registered; export would store both.
    used = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in used:
            owner_name, _, attr = name.rpartition(".")
            owner = graph.get_submodule(owner_name)
            owner._parameters.pop(attr, None)
            owner._buffers.pop(attr, None)


def _strip_debug_info(program: ExportedProgram) -> None:
    # Stack traces and provenance only serve debugging and would weigh on a small file.
    program.example_inputs = None
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
        node.meta.pop("from_node", None)
