"""Fold inference-mode BatchNorm into the convolution that precedes it.

Wav2Lip puts a ``BatchNorm2d`` straight after every ``Conv2d`` and ``ConvTranspose2d`` inside the
``conv_block`` Sequentials. In eval mode that BatchNorm is a per-output-channel affine map, so it
can be absorbed into the conv's weight and bias. Export and int8 quantization then see one op per
layer, and quantization observes the weights that will actually run. The ReLU is left alone: in
residual layers the identity add sits between the BatchNorm and the ReLU.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

__all__ = ["fold_batchnorm"]

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
