"""LSE-D / LSE-C style sync scores: the arithmetic, the expert plumbing, and offset ranking.

The ranking tests need an expert that really knows sync. Training the 16 M-parameter SyncNet is
far too slow for a test, so :class:`MouthLoudnessExpert` is built by hand for the generated
sample (``data.synthetic``), whose drawn mouth opens with the loudness of its voice: it has the
SyncNet contract (``(audio, face)`` in, unit-norm non-negative embeddings out), and its face and
audio embeddings agree exactly when the mouth follows the sound.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from data.audio import load_audio, save_wav
from data.dataset import MEL_CACHE, WindowDataset
from data.synthetic import make_synthetic_dataset
from models.sync_scores import best_offset, lse_scores, mean_distances, sync_distances
from models.syncnet import SyncNet, sync_input

SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
SHIFT = 5  # frames the audio is moved by in the misaligned copies
WINDOWS = 24


class MouthLoudnessExpert(nn.Module):
    """Face: mouth opening per frame. Audio: loudness at each frame's instant. Both standardised.

    The generated mouth is the only dark red in a crop (BGR about (0.16, 0.08, 0.47), against skin
    with every channel above 0.35 and a background with red below 0.31), so its area is the share
    of lower-half pixels with green under 0.12 and red over 0.4. Frame t of a window starting at
    mel column ``mel_start(start, 0)`` has its instant in column 3.2 t to 3.2 t + 1. Each
    5-step profile becomes ``[relu(z), relu(-z)]`` of its z-scores, L2-normalised.
    """

    def forward(self, audio: torch.Tensor, face: torch.Tensor) -> tuple[torch.Tensor, ...]:
        frames = face.unflatten(1, (5, 3))
        green, red = frames[:, :, 1], frames[:, :, 2]
        mouth = ((green < 0.12) & (red > 0.4)).float().mean((-2, -1))
        level = audio[:, 0].mean(1)  # (N, 16): mean log-mel level per column
        loudness = torch.stack([level[:, int(3.2 * t):int(3.2 * t) + 2].mean(1)
                                for t in range(5)], dim=1)
        return self._embed(loudness), self._embed(mouth)

    @staticmethod
    def _embed(profile: torch.Tensor) -> torch.Tensor:
        centred = profile - profile.mean(1, keepdim=True)
        z = centred / (profile.std(1, keepdim=True) + 1e-3)
        return F.normalize(torch.cat([z.clamp(min=0), (-z).clamp(min=0)], dim=1), dim=1)


def shifted_copy(root: Path, dest: Path, frames: int) -> Path:
    """Copy a generated dataset with every clip's sound moved ``frames`` later (earlier if < 0)."""
    shutil.copytree(root, dest)
    n = SAMPLES_PER_FRAME * abs(frames)
    for clip in sorted(dest.glob("synthetic/clip*")):
        wav = load_audio(clip / "audio.wav")
        moved = torch.zeros_like(wav)
        if frames > 0:
            moved[n:] = wav[:-n]
        else:
            moved[:-n] = wav[n:]
        save_wav(clip / "audio.wav", moved)
        (clip / MEL_CACHE).unlink(missing_ok=True)
    return dest


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The generated sample (shift 0) and copies with the audio SHIFT frames late and early."""
    base = tmp_path_factory.mktemp("sync")
    aligned = make_synthetic_dataset(base / "aligned", n_clips=2, n_val=1)
    return {0: aligned, **{s: shifted_copy(aligned, base / f"shift{s}", s)
                           for s in (SHIFT, -SHIFT)}}


def distances(root: Path, expert: nn.Module, k: int) -> torch.Tensor:
    dataset = WindowDataset(root, "val", length=WINDOWS, deterministic=True, sync_offsets=k)
    batch = default_collate([dataset[i] for i in range(WINDOWS)])
    return sync_distances(expert, batch["target"], batch["sync_mels"])


def test_lse_scores_by_hand() -> None:
    d = torch.tensor([[3.0, 1.0, 2.0, 4.0, 5.0],
                      [5.0, 1.0, 2.0, 2.0, 5.0]])
    # Means per offset -2..2: 4, 1, 2, 3, 5 -> minimum 1 at offset -1, median 3.
    assert mean_distances(d).tolist() == [4.0, 1.0, 2.0, 3.0, 5.0]
    assert lse_scores(d) == (1.0, 2.0)
    assert best_offset(d) == -1
    single = torch.tensor([[0.5]])  # K = 0: one offset, no confidence
    assert best_offset(single) == 0 and lse_scores(single) == (0.5, 0.0)
    with pytest.raises(ValueError, match="2K\\+1"):
        lse_scores(torch.ones(3, 4))


def test_sync_distances_run_the_real_expert_once_per_window() -> None:
    torch.manual_seed(0)
    syncnet = SyncNet().train()  # scoring must not depend on the batch: eval mode inside
    calls: dict[str, list[int]] = {"face": [], "audio": []}
    for name in calls:
        getattr(syncnet, f"{name}_encoder").register_forward_hook(
            lambda m, args, out, name=name: calls[name].append(args[0].shape[0]))
    frames = torch.rand(2, 3, 5, 96, 96)
    mels = torch.rand(2, 3, 1, 80, 16) * 8 - 4
    d = sync_distances(syncnet, frames, mels)
    assert calls == {"face": [2], "audio": [6]}
    assert d.shape == (2, 3) and not d.requires_grad and syncnet.training
    # Reference: every (window, offset) pair as its own expert input, window-major.
    syncnet.eval()
    with torch.no_grad():
        audio_emb, face_emb = syncnet(mels.flatten(0, 1),
                                      sync_input(frames).repeat_interleave(3, dim=0))
    expected = (audio_emb - face_emb).norm(dim=1).view(2, 3)
    assert torch.allclose(d, expected, atol=1e-5), (d, expected)
    # Unit-norm, non-negative embeddings: distances lie in [0, sqrt(2)].
    assert 0.0 <= float(d.min()) and float(d.max()) <= math.sqrt(2) + 1e-6
    with pytest.raises(ValueError, match="one set of mel offsets per window"):
        sync_distances(syncnet, frames, mels[:1])


def test_aligned_audio_scores_better_than_shifted(roots: dict[int, Path]) -> None:
    expert = MouthLoudnessExpert()
    # Searching 2 frames each way cannot reach a 5-frame shift: the shifted copies score worse.
    near = {s: lse_scores(distances(root, expert, 2)) for s, root in roots.items()}
    for shift in (SHIFT, -SHIFT):
        assert near[0][0] + 0.2 < near[shift][0], near
    assert best_offset(distances(roots[0], expert, 2)) == 0


@pytest.mark.parametrize("shift", [0, SHIFT, -SHIFT])
def test_best_offset_finds_the_shift(roots: dict[int, Path], shift: int) -> None:
    expert = MouthLoudnessExpert()
    k = SHIFT + 2
    d = distances(roots[shift], expert, k)
    aligned = distances(roots[0], expert, k)
    # Sound moved `shift` frames later matches the face `shift` frames further on.
    assert best_offset(d) == shift
    # At the file's own alignment (offset 0, column k) the aligned sample is the closer one.
    if shift:
        assert float(aligned[:, k].mean()) + 0.3 < float(d[:, k].mean())
    # Searching far enough finds the same best distance; the confidence shows the fit is sharp.
    lse_d, lse_c = lse_scores(d)
    assert lse_d == pytest.approx(lse_scores(aligned)[0], abs=0.02)
    assert lse_c > 0.4
