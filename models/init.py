"""Start a student from the teacher's most important channels instead of from noise.

Every conv of a Wav2Lip generator writes one *channel group* and reads one or two (a decoder input
is the previous decoder block's output followed by a face-encoder skip). Coupled channels share a
group, so one choice of kept indices serves all of them:

- a stage conv and its residual layers (the identity add ties their channels together);
- a face-encoder stage's output, the next stage's input and the slice of the decoder input that
  its skip is concatenated into (after the decoder block's own channels);
- a decoder block's output and the first slice of the next block's (or the head's) input;
- the audio embedding and decoder block 0's input; the face bottleneck and the second slice of
  decoder block 1's input.

For each group the kept channels are the student's width worth of the teacher's, highest score
first; the student's channel ``i`` is the teacher channel with the ``i``-th highest score, so a
full-width student is the teacher with its channels permuted and computes the same function.
A group's score is the sum, over the teacher layers that write it (the stage conv and *all* its
residual layers, also those the student drops), of a per-channel score: the L1 norm of the output
filter (``"l1"``), the absolute BatchNorm scale (``"bn_scale"``), or a callable's. Conv weights,
biases and every BatchNorm tensor (running statistics included) are then copied by index.

A student stage that keeps ``k`` residual layers takes the teacher's first ``k`` of that stage
(student layer ``r`` from teacher layer ``r``), in the face, audio and decoder alike.

Torch-Pruning (DepGraph) groups coupled channels by tracing, but it prunes a model in place by
ratios, cannot drop residual layers, and has open issues on exactly this graph's concatenations
of tensors from different sources (#481, #146). Wav2Lip's coupling is fixed and small, so it is
written out here from the stage tables, which makes it exact and dependency-free; the tests prove
it by permuting every group of a full-width teacher and getting the same outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.wav2lip import Conv2d, Conv2dTranspose, Wav2Lip

__all__ = ["Importance", "channel_groups", "group_importance", "init_from_teacher_"]

log = logging.getLogger(__name__)

# A custom score: (group name, the teacher's conv wrappers that write it) -> one score per channel.
ImportanceFn = Callable[[str, list[nn.Module]], torch.Tensor]
Importance = str | ImportanceFn
IMPORTANCES = ("l1", "bn_scale")

# Inputs that are never pruned: the 6 face channels, the mel channel, the 3 output colours.
_FIXED = {"face_in": 6, "audio_in": 1, "rgb": 3}


@dataclass(frozen=True)
class _Layer:
    """One conv of the generator: where it is, which groups it reads, which group it writes."""

    path: str
    inputs: tuple[str, ...]
    output: str


def _layers(model: Wav2Lip) -> dict[str, _Layer]:
    """Every conv of ``model`` keyed by a logical id that a teacher and its students share."""
    counts = model.spec.residual_counts()
    layers: dict[str, _Layer] = {}

    def add(key: str, path: str, inputs: tuple[str, ...], output: str) -> None:
        layers[key] = _Layer(path, inputs, output)

    previous = "face_in"
    for i, n_res in enumerate(counts["face"]):
        group = f"face{i}"
        add(f"face{i}.0", f"face_encoder_blocks.{i}.0", (previous,), group)
        for r in range(1, n_res + 1):
            add(f"face{i}.{r}", f"face_encoder_blocks.{i}.{r}", (group,), group)
        previous = group
    add("face6.0", "face_encoder_blocks.6.0", (previous,), "face6a")
    add("face6.1", "face_encoder_blocks.6.1", ("face6a",), "face6b")

    previous, index = "audio_in", 0
    for s, n_res in enumerate(counts["audio"]):
        group = f"audio{s}"
        for r in range(n_res + 1):
            add(f"audio{s}.{r}", f"audio_encoder.{index}", (previous if r == 0 else group,), group)
            index += 1
        previous = group
    add("audio4.0", f"audio_encoder.{index}", (previous,), "audio4a")
    add("audio4.1", f"audio_encoder.{index + 1}", ("audio4a",), "audio4b")

    add("dec0.0", "face_decoder_blocks.0.0", ("audio4b",), "dec0")
    # Decoder block j reads block j-1's output, then the skip concatenated after it.
    skips = ["face6b", "face5", "face4", "face3", "face2", "face1", "face0"]
    for j, n_res in enumerate(counts["decoder"], start=1):
        group, inputs = f"dec{j}", (f"dec{j - 1}", skips[j - 1])
        add(f"dec{j}.0", f"face_decoder_blocks.{j}.0", inputs, group)
        for r in range(1, n_res + 1):
            add(f"dec{j}.{r}", f"face_decoder_blocks.{j}.{r}", (group,), group)
    add("head", "output_block.0", ("dec6", skips[6]), "head")
    add("out", "output_block.1", ("head",), "rgb")
    return layers


def _conv_of(module: nn.Module) -> nn.Conv2d | nn.ConvTranspose2d:
    return module.conv_block[0] if isinstance(module, (Conv2d, Conv2dTranspose)) else module


def _group_widths(model: Wav2Lip, layers: dict[str, _Layer]) -> dict[str, int]:
    widths = dict(_FIXED)
    for layer in layers.values():
        widths.setdefault(layer.output, _conv_of(model.get_submodule(layer.path)).out_channels)
    return widths


def channel_groups(model: Wav2Lip) -> dict[str, list[str]]:
    """Coupled channel groups of ``model``: group name -> module paths of the layers writing it."""
    groups: dict[str, list[str]] = {}
    for layer in _layers(model).values():
        if layer.output not in _FIXED:
            groups.setdefault(layer.output, []).append(layer.path)
    return groups


def _layer_score(module: nn.Module, importance: str) -> torch.Tensor:
    conv, bn = module.conv_block[0], module.conv_block[1]
    if importance == "bn_scale":
        return bn.weight.detach().double().abs()
    # ConvTranspose2d stores (in, out, kH, kW), Conv2d (out, in, kH, kW).
    out_dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0
    dims = [d for d in range(conv.weight.dim()) if d != out_dim]
    # Summed in float64 so that the ranking does not depend on the channel order.
    return conv.weight.detach().double().abs().sum(dim=dims)


@torch.no_grad()
def group_importance(teacher: Wav2Lip, importance: Importance = "l1") -> dict[str, torch.Tensor]:
    """Per-channel scores of every coupled group of ``teacher`` (higher is kept first).

    Args:
        teacher: The generator whose channels are scored.
        importance: ``"l1"`` (filter L1 norm), ``"bn_scale"`` (absolute BatchNorm weight), or a
            callable ``(group name, conv wrappers writing it) -> scores`` of the group's width.

    Returns:
        Group name -> float scores, one per channel; a group's score is the sum over its layers.
    """
    if isinstance(importance, str) and importance not in IMPORTANCES:
        raise ValueError(f"importance {importance!r} is not one of {IMPORTANCES} or a callable")
    scores = {}
    for name, paths in channel_groups(teacher).items():
        modules = [teacher.get_submodule(p) for p in paths]
        width = _conv_of(modules[0]).out_channels
        if callable(importance):
            score = torch.as_tensor(importance(name, modules), dtype=torch.float64).flatten()
        else:
            score = sum(_layer_score(m, importance) for m in modules)
        if score.shape != (width,):
            raise ValueError(f"importance for group {name} has shape {tuple(score.shape)}, "
                             f"needs ({width},): one score per channel")
        scores[name] = score.cpu()
    return scores


def _check_fits(student: Wav2Lip, teacher: Wav2Lip, s_width: dict, t_width: dict) -> None:
    wider = [g for g in s_width if s_width[g] > t_width.get(g, 0)]
    if wider:
        g = wider[0]
        raise ValueError(f"student group {g} has {s_width[g]} channels, the teacher only "
                         f"{t_width.get(g, 0)}; initialise from a teacher at least as wide")
    for stage, counts in student.spec.residual_counts().items():
        most = teacher.spec.residual_counts()[stage]
        if any(c > m for c, m in zip(counts, most)):
            raise ValueError(f"student keeps {list(counts)} {stage} residual layers, the teacher "
                             f"has {list(most)}; keep at most the teacher's per stage")


@torch.no_grad()
def init_from_teacher_(
    student: Wav2Lip, teacher: Wav2Lip, importance: Importance = "l1"
) -> Wav2Lip:
    """Overwrite ``student``'s weights with the teacher's most important channels, in place.

    Args:
        student: Generator to initialise; every width and residual count at most the teacher's.
        teacher: Source generator (usually the original); it is not modified.
        importance: ``"l1"``, ``"bn_scale"`` or a custom scorer, see :func:`group_importance`.

    Returns:
        ``student``, whose conv weights, biases and BatchNorm tensors come from the teacher.
    """
    s_layers, t_layers = _layers(student), _layers(teacher)
    s_width = _group_widths(student, s_layers)
    t_width = _group_widths(teacher, t_layers)
    _check_fits(student, teacher, s_width, t_width)

    scores = group_importance(teacher, importance)
    kept = {g: torch.arange(n) for g, n in _FIXED.items()}
    for group, score in scores.items():
        # Stable sort: ties keep the teacher's order, so equal scores give the identity.
        order = torch.sort(score, descending=True, stable=True).indices
        kept[group] = order[:s_width[group]]

    for key, layer in s_layers.items():
        source = t_layers[key]
        assert source.inputs == layer.inputs, f"{key}: inputs {source.inputs} != {layer.inputs}"
        offsets = torch.cumsum(torch.tensor([0] + [t_width[g] for g in layer.inputs]), 0)
        in_idx = torch.cat([kept[g] + offsets[n] for n, g in enumerate(layer.inputs)])
        out_idx = kept[layer.output]
        _copy_layer(student.get_submodule(layer.path), teacher.get_submodule(source.path),
                    in_idx, out_idx)
    log.info("initialised the student from the teacher's channels by <%s> importance",
             importance if isinstance(importance, str) else "custom")
    # TODO(student-init): re-estimate BatchNorm statistics on a few batches after slimming; the
    # copied ones no longer fit thinner layers (README, known limitations).
    return student


def _copy_layer(
    dst: nn.Module, src: nn.Module, in_idx: torch.Tensor, out_idx: torch.Tensor
) -> None:
    d_conv, s_conv = _conv_of(dst), _conv_of(src)
    weight = s_conv.weight.detach()
    if isinstance(s_conv, nn.ConvTranspose2d):
        weight = weight[in_idx.to(weight.device)][:, out_idx.to(weight.device)]
    else:
        weight = weight[out_idx.to(weight.device)][:, in_idx.to(weight.device)]
    if weight.shape != d_conv.weight.shape:
        raise ValueError(f"cannot copy a {tuple(weight.shape)} weight into "
                         f"{tuple(d_conv.weight.shape)}; the student's layers do not line up")
    d_conv.weight.copy_(weight)
    if s_conv.bias is not None and d_conv.bias is not None:
        d_conv.bias.copy_(s_conv.bias[out_idx.to(s_conv.bias.device)])
    if isinstance(dst, (Conv2d, Conv2dTranspose)):
        d_bn, s_bn = dst.conv_block[1], src.conv_block[1]
        for name in ("weight", "bias", "running_mean", "running_var"):
            source = getattr(s_bn, name)
            getattr(d_bn, name).copy_(source[out_idx.to(source.device)])
        d_bn.num_batches_tracked.copy_(s_bn.num_batches_tracked)
