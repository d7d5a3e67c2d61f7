"""Image fidelity measures shared by training logs, export reports and tests."""

from __future__ import annotations

import torch
from torch import Tensor


def psnr_db(a: Tensor, b: Tensor, peak: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB as a 0-d tensor (inf when identical).

    Computed in float64, so that a bf16 or fp16 output does not round the error away, and kept
    on the inputs' device, so that logging it every step needs no host synchronisation.
    """
    mse = torch.mean((a.double() - b.double()) ** 2)
    return 10.0 * torch.log10(peak**2 / mse)
