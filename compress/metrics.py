"""Image fidelity measures shared by training logs, export reports and tests."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure


def psnr_db(a: Tensor, b: Tensor, peak: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB as a 0-d tensor (inf when identical).

    Computed in float64, so that a bf16 or fp16 output does not round the error away, and kept
    on the inputs' device, so that logging it every step needs no host synchronisation.
    """
    mse = torch.mean((a.double() - b.double()) ** 2)
    return 10.0 * torch.log10(peak**2 / mse)


def lower_half(frames: Tensor) -> Tensor:
    """Rows ``H // 2`` onwards (the mouth region Wav2Lip generates) of images or windows."""
    return frames[..., frames.shape[-2] // 2:, :]


def as_images(frames: Tensor) -> Tensor:
    """(B, C, T, H, W) windows to (B*T, C, H, W) images, time-major as the generator flattens.

    4-D input is returned as is.
    """
    if frames.dim() == 5:
        return frames.permute(2, 0, 1, 3, 4).flatten(0, 1)
    if frames.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) images or (B, C, T, H, W) windows, got "
                         f"{tuple(frames.shape)}")
    return frames


def ssim_index(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean structural similarity (torchmetrics: 11x11 Gaussian window, sigma 1.5) over images.

    Windows are split into frames first (a 5-D tensor would be read as 3-D volumes). Each side
    needs at least 11 pixels. Computed in float32 with autocast off: SSIM subtracts squared
    means from means of squares, which bf16 or fp16 would cancel into noise.
    """
    with torch.autocast(a.device.type, enabled=False):
        return structural_similarity_index_measure(
            as_images(a).float(), as_images(b).float(), data_range=data_range
        )
