"""Parameter and multiply-accumulate (MAC) counts for Wav2Lip generators.

Convolution MACs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts a transposed
convolution by its *input* positions (every input pixel meets the whole kernel once: the true
multiply count) and reports FLOPs as two per MAC. thop, and the 28x figure of Nota's compressed
Wav2Lip, count transposed convolutions by their *output* positions instead, which inflates
Wav2Lip's decoder by about half. Both conventions are returned; say which one you quote. Biases,
BatchNorm, ReLU, additions and concatenations are not counted.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_parameters", "count_macs"]

log = logging.getLogger(__name__)

# FlopCounterMode keys its counts by overload packet, not by overload.
_CONV_OPS = (
    torch.ops.aten.convolution,
    torch.ops.aten._convolution,
    torch.ops.aten.convolution_overrideable,
)


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameter elements (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int = 96) -> dict[str, int]:
    """Count convolution MACs for one frame: a 6 x S x S face and a 1 x 80 x 16 mel, batch 1.

    Args:
        model: A Wav2Lip-style generator called as ``model(audio, face)``.
        img_size: Face crop side S in pixels.

    Returns:
        ``macs_convt_input``: transposed convs counted by input positions (true multiplies).
        ``macs_convt_output``: transposed convs counted by output positions (thop convention).
        ``macs_convt_only_input`` / ``macs_convt_only_output``: the transposed-conv share of each.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    audio = torch.zeros(1, 1, 80, 16, device=device, dtype=dtype)
    face = torch.zeros(1, 6, img_size, img_size, device=device, dtype=dtype)

    by_input, by_output = 0, 0

    def on_convt(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal by_input, by_output
        assert isinstance(module, nn.ConvTranspose2d), "hook registered on a non-ConvTranspose2d"
        # Weight is (in, out / groups, kH, kW), so its numel is in * out / groups * kH * kW.
        per_position = module.weight.numel()
        batch = inputs[0].shape[0]
        by_input += batch * inputs[0].shape[2:].numel() * per_position
        by_output += batch * out.shape[2:].numel() * per_position

    handles = [
        m.register_forward_hook(on_convt)
        for m in model.modules()
        if isinstance(m, nn.ConvTranspose2d)
    ]
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(audio, face)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    counts = counter.get_flop_counts()["Global"]
    other = {str(op): n for op, n in counts.items() if op not in _CONV_OPS and n}
    if other:
        log.warning("count_macs ignores non-convolution FLOPs: %s", other)
    conv_flops = sum(n for op, n in counts.items() if op in _CONV_OPS)
    # FlopCounterMode counts two FLOPs per multiply-accumulate.
    macs_input = conv_flops // 2
    return {
        "macs_convt_input": macs_input,
        "macs_convt_output": macs_input - by_input + by_output,
        "macs_convt_only_input": by_input,
        "macs_convt_only_output": by_output,
    }
