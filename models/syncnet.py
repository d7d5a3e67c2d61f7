"""The expert lip-sync discriminator (``SyncNet_color``) of Wav2Lip, its input helper and loss.

Re-implemented from the architecture facts of Prajwal et al., "A Lip Sync Expert Is All You Need
for Speech to Lip Generation In The Wild" (ACM MM 2020); no code is taken from the original.
Module and parameter names match the released ``lipsync_expert.pth``, so it loads without
renaming. The expert is frozen while the generator trains: it scores how well the lower halves of
5 generated frames match their mel window.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import load_weights
from models.wav2lip import Conv2d

__all__ = [
    "SYNC_T",
    "SyncNet",
    "cosine_sync_loss",
    "load_syncnet",
    "sync_input",
]


SYNC_T = 5  # frames per expert window; the face input stacks their lower halves on channels
EMBED_DIM = 512
# Lower bound for the similarity fed to BCE: keeps -log finite (16.1 at most) for orthogonal or
# all-zero embeddings, where BCE would otherwise saturate at its internal -100 log clamp.
SIM_EPS = 1e-7

class SyncNet(nn.Module):
    """Expert lip-sync network: a face encoder and an audio encoder into a shared 512-d space.

    ``forward(audio, face)`` takes audio first, as the original does: mel (N, 1, 80, 16) and face
    (N, 15, 48, 96), the lower halves of 5 BGR frames in [0, 1] (see :func:`sync_input`). It
    returns ``(audio_emb, face_emb)``, each (N, 512) with unit L2 norm.
    """

    def __init__(self) -> None:
        super().__init__()
        # Indices must match the released Sequentials: residual layers sit between stage convs.
        self.face_encoder = nn.Sequential(
            Conv2d(3 * SYNC_T, 32, 7, 1, 3),
            Conv2d(32, 64, 5, (1, 2), 1),
            *_residuals(64, 2),
            Conv2d(64, 128, 3, 2, 1),
            *_residuals(128, 3),
            Conv2d(128, 256, 3, 2, 1),
            *_residuals(256, 2),
            Conv2d(256, 512, 3, 2, 1),
            *_residuals(512, 2),
            Conv2d(512, 512, 3, 2, 1),
            Conv2d(512, 512, 3, 1, 0),
            Conv2d(512, EMBED_DIM, 1, 1, 0),
        )
        self.audio_encoder = nn.Sequential(
            Conv2d(1, 32, 3, 1, 1),
            *_residuals(32, 2),
            Conv2d(32, 64, 3, (3, 1), 1),
            *_residuals(64, 2),
            Conv2d(64, 128, 3, 3, 1),
            *_residuals(128, 2),
            Conv2d(128, 256, 3, (3, 2), 1),
            *_residuals(256, 2),
            Conv2d(256, 512, 3, 1, 0),
            Conv2d(512, EMBED_DIM, 1, 1, 0),
        )

    def forward(
        self, audio: torch.Tensor, face: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if face.dim() != 4 or face.shape[1] != 3 * SYNC_T:
            raise ValueError(
                f"SyncNet needs face (N, {3 * SYNC_T}, 48, 96), got {tuple(face.shape)}; "
                "turn a (B, 3, 5, 96, 96) window into that with sync_input()"
            )
        audio_emb = self.audio_encoder(audio).flatten(1)
        face_emb = self.face_encoder(face).flatten(1)
        return F.normalize(audio_emb, p=2, dim=1), F.normalize(face_emb, p=2, dim=1)


def _residuals(channels: int, count: int) -> list[nn.Module]:
    return [Conv2d(channels, channels, 3, 1, 1, residual=True) for _ in range(count)]


def sync_input(frames: torch.Tensor) -> torch.Tensor:
    """Turn a generator window into the expert's face input.

    Args:
        frames: (B, 3, 5, H, W) window, e.g. the generator's (B, 3, 5, 96, 96) output.

    Returns:
        (B, 15, H // 2, W): the lower half (rows H // 2 onwards) of each frame, frames
        concatenated on channels in time order (frame 0's BGR, then frame 1's, ...).
    """
    if frames.dim() != 5 or frames.shape[1] != 3 or frames.shape[2] != SYNC_T:
        raise ValueError(
            f"sync_input needs a (B, 3, {SYNC_T}, H, W) window, got {tuple(frames.shape)}"
        )
    lower = frames[:, :, :, frames.shape[3] // 2:]
    # (B, 3, T, h, W) -> (B, T, 3, h, W) so that flattening keeps each frame's channels together.
    return lower.transpose(1, 2).flatten(1, 2)


def cosine_sync_loss(audio_emb: torch.Tensor, face_emb: torch.Tensor) -> torch.Tensor:
    """Sync loss of the original: BCE of the embeddings' cosine similarity against 1.

    The similarity is clamped into [1e-7, 1]: rounding can push it just above 1, which BCE
    rejects, and a zero or orthogonal pair would give log(0), which BCE saturates at 100. The
    expert's embeddings leave a ReLU, so they are non-negative and a similarity below 0 cannot
    occur; in between the clamp changes nothing.

    Args:
        audio_emb: (N, D) audio embeddings.
        face_emb: (N, D) face embeddings.

    Returns:
        Scalar mean of ``-log(similarity)`` over the batch.
    """
    similarity = F.cosine_similarity(audio_emb, face_emb, dim=1).clamp(SIM_EPS, 1.0)
    return F.binary_cross_entropy(similarity, torch.ones_like(similarity))


def load_syncnet(path: str | Path, freeze: bool = True) -> SyncNet:
    """Build a :class:`SyncNet` and load a released-format file such as ``lipsync_expert.pth``.

    Every key and shape is checked first; a wrong or damaged file raises a one-line
    :class:`~models.checkpoint.CheckpointError` saying what it is and what to give instead.

    Args:
        path: Checkpoint file (``{"state_dict": ...}``, optional ``module.`` prefix) or a bare
            state dict.
        freeze: Return the model in eval mode with gradients off for its parameters, as the
            frozen expert needs (BatchNorm must keep its running statistics); gradients still
            flow through it to the generator.

    Returns:
        The loaded model, on the CPU.
    """
    model = load_weights(SyncNet(), path, kind="SyncNet")
    if freeze:
        model.eval().requires_grad_(False)
    return model
