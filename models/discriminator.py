"""The visual-quality discriminator (``Wav2Lip_disc_qual``) of Wav2Lip's GAN variant.

Re-implemented from the architecture facts of Prajwal et al., "A Lip Sync Expert Is All You Need
for Speech to Lip Generation In The Wild" (ACM MM 2020); no code is taken from the original.
Module and parameter names match the released ``visual_quality_disc.pth``, so it loads without
renaming. It judges single frames, looking only at their lower (mouth) half.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import load_weights

__all__ = ["NoNormConv2d", "QualityDiscriminator", "load_discriminator"]


KIND = "visual-quality discriminator"
# (cin, cout, kernel, stride, padding) per layer of each face encoder block.
BLOCKS: tuple[tuple[tuple[int, int, int, int | tuple[int, int], int], ...], ...] = (
    ((3, 32, 7, 1, 3),),
    ((32, 64, 5, (1, 2), 2), (64, 64, 5, 1, 2)),
    ((64, 128, 5, 2, 2), (128, 128, 5, 1, 2)),
    ((128, 256, 5, 2, 2), (256, 256, 5, 1, 2)),
    ((256, 512, 3, 2, 1), (512, 512, 3, 1, 1)),
    ((512, 512, 3, 2, 1), (512, 512, 3, 1, 1)),
    ((512, 512, 3, 1, 0), (512, 512, 1, 1, 0)),
)


class NoNormConv2d(nn.Module):
    """Conv (with bias) + LeakyReLU(0.01), no BatchNorm; the original's ``nonorm_Conv2d``."""

    def __init__(
        self, cin: int, cout: int, kernel_size: int, stride: int | tuple[int, int], padding: int
    ) -> None:
        super().__init__()
        # A one-layer Sequential only so that keys read `conv_block.0.*` like the released file.
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding))
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


class QualityDiscriminator(nn.Module):
    """Visual-quality discriminator: probability that each frame's lower half is real.

    ``forward(faces)`` takes 5-D windows (B, 3, T, 96, 96), flattened time-major like the
    generator (row t*B + b), or single frames (N, 3, 96, 96); BGR in [0, 1]. Only rows
    H // 2 onwards are seen. It returns (N, 1) probabilities, N = B*T for windows.
    """

    def __init__(self) -> None:
        super().__init__()
        self.face_encoder_blocks = nn.ModuleList(
            nn.Sequential(*(NoNormConv2d(*layer) for layer in block)) for block in BLOCKS
        )
        self.binary_pred = nn.Sequential(nn.Conv2d(512, 1, 1, 1, 0), nn.Sigmoid())

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        if faces.dim() == 5:
            faces = faces.permute(2, 0, 1, 3, 4).flatten(0, 1)
        if faces.dim() != 4 or faces.shape[1] != 3:
            raise ValueError(
                f"the discriminator needs (B, 3, T, H, W) or (N, 3, H, W) frames, got "
                f"{tuple(faces.shape)}"
            )
        x = faces[:, :, faces.shape[2] // 2:]
        for block in self.face_encoder_blocks:
            x = block(x)
        return self.binary_pred(x).flatten(1)

    def perceptual_loss(self, fake: torch.Tensor) -> torch.Tensor:
        """Generator's adversarial term, as the original's ``perceptual_forward``: BCE(D(fake), 1).

        Gradients reach the generator through ``fake``; step only the generator's optimiser on it.

        Args:
            fake: Generated frames, in any layout :meth:`forward` takes.

        Returns:
            Scalar loss.
        """
        pred = self(fake)
        return F.binary_cross_entropy(pred, torch.ones_like(pred))

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Discriminator's own loss, as the original trains it: BCE(D(real), 1) + BCE(D(fake), 0).

        ``fake`` is detached so that this loss never trains the generator.

        Args:
            real: Ground-truth frames.
            fake: Generated frames.

        Returns:
            Scalar loss (the sum of the two means).
        """
        real_pred, fake_pred = self(real), self(fake.detach())
        return (F.binary_cross_entropy(real_pred, torch.ones_like(real_pred))
                + F.binary_cross_entropy(fake_pred, torch.zeros_like(fake_pred)))


def load_discriminator(path: str | Path) -> QualityDiscriminator:
    """Build a :class:`QualityDiscriminator` and load a file such as ``visual_quality_disc.pth``.

    Every key and shape is checked first; a wrong or damaged file raises a one-line
    :class:`~models.checkpoint.CheckpointError`. The model is returned trainable, on the CPU: the
    GAN variant keeps training it (it has no BatchNorm, so train and eval modes agree).

    Args:
        path: Checkpoint file (``{"state_dict": ...}``, optional ``module.`` prefix) or a bare
            state dict.

    Returns:
        The loaded model.
    """
    return load_weights(QualityDiscriminator(), path, kind=KIND)
