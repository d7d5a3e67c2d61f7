"""Generator loss terms of the distillation recipe, as pure functions of tensors and models.

- :func:`mouth_weighted_l1`: L1 with extra weight on the lower half (the mouth region Wav2Lip
  generates, as in content-aware distillation, Liu et al., CVPR 2021).
- :func:`feature_distillation_loss`: MSE between 1x1-adapted student features and teacher
  features, mean over taps (GAN Compression, Li et al., CVPR 2020).
- :func:`sync_loss`: the original Wav2Lip's expert sync loss on a generated window.
- :func:`ssim_loss`: 1 - SSIM (as OMGD's student loss, Ren et al., ICCV 2021).
- :func:`weighted_sum`: the generator total.

The LightningModule (:mod:`models.distiller`) wires them; each is tested against hand-computed
values in ``tests/test_losses.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from compress.metrics import ssim_index
from models.syncnet import SyncNet, cosine_sync_loss, sync_input

__all__ = [
    "feature_distillation_loss",
    "mouth_weighted_l1",
    "ssim_loss",
    "sync_loss",
    "weighted_sum",
]


def mouth_weighted_l1(pred: Tensor, target: Tensor, mouth_weight: float = 0.0) -> Tensor:
    """L1 where each pixel of the lower half (rows ``H // 2`` onwards) counts ``1 + mouth_weight``
    times, normalised by the total weight.

    The normalisation keeps a uniform error ``e`` at ``e`` for any ``mouth_weight``, so the L1
    weights need no retuning when the mouth weight changes; ``mouth_weight=0`` is plain L1.
    Computed in float32 whatever the inputs' precision.

    Args:
        pred: Images (N, C, H, W) or windows (B, C, T, H, W).
        target: Same shape as ``pred``.
        mouth_weight: Extra weight of the lower half, >= 0.
    """
    error = (pred.float() - target.float()).abs()
    if not mouth_weight:
        return error.mean()
    height = error.shape[-2]
    row_weight = torch.ones(height, 1, device=error.device)
    row_weight[height // 2:] += mouth_weight
    return (error * row_weight).sum() / (row_weight.sum() * error.numel() / height)


def feature_distillation_loss(
    student_features: Mapping[str, Tensor],
    teacher_features: Mapping[str, Tensor],
    adapters: Mapping[str, Callable[[Tensor], Tensor]],
) -> Tensor:
    """Mean over taps of ``MSE(adapter(student feature), teacher feature)``.

    Args:
        student_features: Student features by tap name.
        teacher_features: Teacher features by tap name (same spatial size).
        adapters: For each tap to use, a map from the student's width to the teacher's
            (the module's 1x1 convs). Only these taps are compared.
    """
    if not adapters:
        raise ValueError("feature distillation needs at least one tap")
    terms = [
        torch.mean((adapter(student_features[name]).float()
                    - teacher_features[name].float()) ** 2)
        for name, adapter in adapters.items()
    ]
    return torch.stack(terms).mean()


def sync_loss(syncnet: SyncNet, frames: Tensor, sync_mel: Tensor) -> Tensor:
    """The original's sync loss: BCE of the expert's audio/face cosine similarity against 1.

    The expert sees the lower halves of the 5 generated frames (:func:`~models.syncnet.
    sync_input`). BCE runs in float32 outside autocast, where PyTorch refuses it on GPUs.

    Args:
        syncnet: The frozen expert; gradients flow through it to ``frames``.
        frames: Generated window (B, 3, 5, 96, 96), BGR in [0, 1].
        sync_mel: The window's mel (B, 1, 80, 16).
    """
    audio_emb, face_emb = syncnet(sync_mel, sync_input(frames))
    with torch.autocast(frames.device.type, enabled=False):
        return cosine_sync_loss(audio_emb.float(), face_emb.float())


def ssim_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - SSIM`` over all frames (see :func:`compress.metrics.ssim_index`); 0 when equal."""
    return 1.0 - ssim_index(pred, target)


def weighted_sum(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``sum(weights[k] * terms[k])`` over the terms present; a weight may be 0.

    Raises:
        KeyError: A term has no weight (every logged term must be accounted for).
    """
    missing = [name for name in terms if name not in weights]
    if missing:
        raise KeyError(f"no weight for loss terms {missing}")
    return torch.stack([weights[name] * value.float() for name, value in terms.items()]).sum()
