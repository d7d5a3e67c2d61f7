"""Fold inference-mode BatchNorm into the convolution that precedes it, and fuse safe ReLUs.

Wav2Lip puts a ``BatchNorm2d`` straight after every ``Conv2d`` and ``ConvTranspose2d`` inside the
``conv_block`` Sequentials. In eval mode that BatchNorm is a per-output-channel affine map, so it
can be absorbed into the conv's weight and bias. Export and int8 quantization then see one op per
layer, and quantization observes the weights that will actually run.

:func:`fold_batchnorm` leaves every ReLU alone. :func:`fuse_for_inference` also moves the ReLU
into the conv module, but only in blocks where nothing comes between the BatchNorm and the ReLU:
in the original's residual layers the identity add comes first (``relu(bn(conv(x)) + x)``), so
fusing the ReLU there would compute ``relu(bn(conv(x))) + x``, a different network.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.wav2lip import Conv2d, Conv2dTranspose

__all__ = ["ConvReLU2d", "ConvTransposeReLU2d", "fold_batchnorm", "fuse_for_inference"]

log = logging.getLogger(__name__)

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return an eval-mode deep copy with every conv-then-BatchNorm pair folded into the conv.

    A ``BatchNorm2d`` is folded when it directly follows a ``Conv2d`` or ``ConvTranspose2d`` in the
    same ``nn.Sequential``; it is replaced by ``nn.Identity`` so module names and state-dict keys
    of the conv stay as they were. The input model is not modified.

    Args:
        model: Float model whose BatchNorm layers hold running statistics.

    Returns:
        The folded copy, in eval mode.

    Raises:
        ValueError: If a BatchNorm to fold has no running statistics or a channel count that does
            not match its conv.
    """
    folded = copy.deepcopy(model).eval()
    count = 0
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for prev_name, name in zip(names, names[1:]):
            conv, bn = seq._modules[prev_name], seq._modules[name]
            if isinstance(conv, _CONVS) and isinstance(bn, nn.BatchNorm2d):
                _fold_pair(conv, bn)
                seq._modules[name] = nn.Identity()
                count += 1
    log.info("folded %d BatchNorm2d layers into their convolutions", count)
    return folded


class ConvReLU2d(nn.Conv2d):
    """A ``Conv2d`` followed by ReLU in one module; parameters keep the conv's names."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ConvReLU2d:
        """A fused copy of ``conv`` sharing its hyperparameters, weight and bias values."""
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                    conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        fused.load_state_dict(conv.state_dict())
        return fused.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(super().forward(x))


class ConvTransposeReLU2d(nn.ConvTranspose2d):
    """A ``ConvTranspose2d`` followed by ReLU in one module; parameters keep the conv's names."""

    @classmethod
    def from_conv(cls, conv: nn.ConvTranspose2d) -> ConvTransposeReLU2d:
        """A fused copy of ``conv`` sharing its hyperparameters, weight and bias values."""
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.output_padding, conv.groups, conv.bias is not None,
                    conv.dilation, conv.padding_mode, device=conv.weight.device,
                    dtype=conv.weight.dtype)
        fused.load_state_dict(conv.state_dict())
        return fused.train(conv.training)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        return F.relu(super().forward(x, output_size))


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Return the inference network: BatchNorm folded everywhere, ReLU fused where it is exact.

    Every conv-then-BatchNorm pair is folded (:func:`fold_batchnorm`). In each non-residual
    :class:`~models.wav2lip.Conv2d` block and each :class:`~models.wav2lip.Conv2dTranspose`
    block the conv then becomes a :class:`ConvReLU2d` or :class:`ConvTransposeReLU2d` and the
    block's own ReLU an ``nn.Identity``. Residual blocks keep folded conv, add, ReLU in that
    order. Module names and state-dict keys stay those of :func:`fold_batchnorm`'s output, and
    the exported graph is the same op for op; the fused modules make the conv-ReLU pairs explicit
    (one module each) for export, quantization and inspection. The input model is not modified.

    Args:
        model: Float Wav2Lip generator (teacher or student) whose BatchNorm layers hold running
            statistics.

    Returns:
        The fused copy, in eval mode.
    """
    fused = fold_batchnorm(model)
    count = 0
    for block in fused.modules():
        plain = isinstance(block, Conv2d) and not block.residual
        if plain or isinstance(block, Conv2dTranspose):
            conv = block.conv_block[0]
            if not isinstance(block.act, nn.ReLU):
                raise ValueError(f"cannot fuse {type(block.act).__name__} into {conv}: "
                                 "only ReLU blocks are supported")
            kind = ConvTransposeReLU2d if isinstance(conv, nn.ConvTranspose2d) else ConvReLU2d
            block.conv_block[0] = kind.from_conv(conv)
            block.act = nn.Identity()
            count += 1
    log.info("fused %d ReLUs into their convolutions", count)
    return fused


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fold {bn}: it has no running statistics (track_running_stats=False)"
        )
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"cannot fold {bn} into {conv}: {bn.num_features} features vs "
            f"{conv.out_channels} output channels"
        )
    weight = conv.weight
    # Fold in float64 so the folded layer adds no rounding error of its own.
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv_std)
    new_bias = (bias - bn.running_mean.double()) * scale + beta

    w = weight.double()
    if isinstance(conv, nn.ConvTranspose2d):
        # Transposed weights are (in, out / groups, kH, kW): output channels live on dim 1,
        # split into one slice per group.
        groups = conv.groups
        w = w.reshape(groups, -1, *w.shape[1:])
        w = w * scale.reshape(groups, 1, -1, *([1] * (w.dim() - 3)))
        w = w.reshape(weight.shape)
    else:
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))

    conv.weight.copy_(w.to(weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(weight.dtype))
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))
