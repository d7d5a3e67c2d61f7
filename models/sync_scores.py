"""LSE-D / LSE-C style lip-sync scores, measured with the Wav2Lip expert SyncNet.

The definitions follow the Wav2Lip paper's evaluation (Prajwal et al., ACM MM 2020, after
Chung and Zisserman's SyncNet): for every window, the distance between the face and audio
embeddings is taken with the audio shifted by each offset in -K..K video frames; the distances
are averaged over windows per offset; LSE-D is the minimum of those means and LSE-C the median
minus the minimum. Lower LSE-D and higher LSE-C mean better sync.

These numbers come from the Wav2Lip expert (:class:`models.syncnet.SyncNet`, whose embeddings are
L2-normalised, so a distance lies in [0, 2], and in [0, sqrt(2)] for its non-negative
embeddings), not from syncnet_python's ``syncnet_v2.model`` that the paper's LSE-D (about 6-8)
and LSE-C figures use. They rank our models against each other on the same data and expert; they
are not comparable with published values.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.syncnet import sync_input

__all__ = ["best_offset", "lse_scores", "mean_distances", "sync_distances"]


@torch.no_grad()
def sync_distances(syncnet: nn.Module, frames: Tensor, sync_mels: Tensor) -> Tensor:
    """Euclidean distance between the expert's face and audio embeddings at every audio offset.

    The face embedding is computed once per window and compared with the audio embedding of each
    offset. The expert runs in eval mode (BatchNorm running statistics), whatever its mode was.

    Args:
        syncnet: The expert, called as ``syncnet(audio, face)`` and returning unit-norm
            ``(audio_emb, face_emb)`` (see :class:`models.syncnet.SyncNet`).
        frames: (B, 3, 5, 96, 96) window of generated or real frames, BGR in [0, 1].
        sync_mels: (B, 2K+1, 1, 80, 16) mel windows; row ``j`` starts at the window's first frame
            plus ``j - K`` frames (offset 0 is row K), as ``WindowDataset`` gives ``sync_mels``.

    Returns:
        (B, 2K+1) distances, on the expert's device.
    """
    if sync_mels.dim() != 5 or sync_mels.shape[1] % 2 != 1:
        raise ValueError(f"sync_mels must be (B, 2K+1, 1, 80, 16), got {tuple(sync_mels.shape)}")
    if sync_mels.shape[0] != frames.shape[0]:
        raise ValueError(f"frames hold {frames.shape[0]} windows but sync_mels "
                         f"{sync_mels.shape[0]}; give one set of mel offsets per window")
    param = next(syncnet.parameters(), None)
    device = param.device if param is not None else frames.device
    dtype = param.dtype if param is not None else torch.float32
    batch, n_offsets = sync_mels.shape[:2]
    face = sync_input(frames).to(device, dtype)
    audio = sync_mels.flatten(0, 1).to(device, dtype)
    was_training = syncnet.training
    syncnet.eval()
    try:
        # The encoders are independent, so one call embeds B faces and B * (2K+1) mel windows.
        audio_emb, face_emb = syncnet(audio, face)
    finally:
        syncnet.train(was_training)
    audio_emb = audio_emb.unflatten(0, (batch, n_offsets))
    return torch.linalg.vector_norm(audio_emb - face_emb[:, None], dim=-1)


def mean_distances(distances: Tensor) -> Tensor:
    """(N, 2K+1) distances -> (2K+1,) mean over windows, in float64."""
    if distances.dim() != 2 or distances.shape[0] < 1 or distances.shape[1] % 2 != 1:
        raise ValueError(f"distances must be (N >= 1, 2K+1), got {tuple(distances.shape)}")
    return distances.double().mean(dim=0)


def lse_scores(distances: Tensor) -> tuple[float, float]:
    """LSE-D and LSE-C from (N, 2K+1) distances (see :func:`sync_distances`).

    Returns:
        ``(lse_d, lse_c)``: the minimum over offsets of the mean distance, and the median over
        offsets of the mean distance minus that minimum.
    """
    means = mean_distances(distances)
    lse_d = means.min()
    # 2K+1 offsets: an odd count, so the median is one of the means, as numpy's would be.
    return float(lse_d), float(means.median() - lse_d)


def best_offset(distances: Tensor) -> int:
    """Audio offset in video frames (-K..K) with the lowest mean distance.

    Positive: the face matches audio that comes later than its own, i.e. the sound lags the
    picture by that many frames.
    """
    means = mean_distances(distances)
    return int(means.argmin()) - (means.shape[0] - 1) // 2
