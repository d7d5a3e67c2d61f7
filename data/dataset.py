"""Wav2Lip training windows from the LRS2-style layout, and the LightningDataModule around them.

Layout: ``root/<clip>/<i>.jpg`` face crops indexed on a 25 fps timeline (missing indices are
frames without a face) plus ``root/<clip>/audio.wav`` (16 kHz mono); ``root/train.txt`` and
``root/val.txt`` list clip paths relative to ``root``. Windowing follows the original training
code: 5 consecutive frames, the lower half of the input window zeroed, a reference window from
another time of the same clip, BGR in [0, 1], and one 16-column mel window per frame.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.audio import FPS, MEL_PER_SECOND, MEL_STEP, load_audio, melspectrogram

log = logging.getLogger(__name__)

MEL_PER_FRAME = MEL_PER_SECOND / FPS  # 3.2 mel columns per video frame
WINDOW = 5  # frames per training window (syncnet_T in the original)
IMG_SIZE = 96


class DataError(ValueError):
    """The data folder cannot feed training; the message names what to fix."""


def mel_start(frame: int, offset_frames: int) -> int:
    """First mel column of the 16-column window for video ``frame``.

    ``offset_frames`` shifts the window in video frames: -1 reproduces the original's training
    (each frame's window starts one frame earlier), 0 its inference.
    """
    return int(MEL_PER_FRAME * (frame + offset_frames))


@dataclass
class Clip:
    """One preprocessed clip: its frame indices and its normalised mel (80, T)."""

    path: Path
    frames: list[int]
    mel: torch.Tensor

    def window_starts(self, offset_frames: int) -> list[int]:
        """Frames that start 5 consecutive existing frames whose mel windows all fit."""
        present = set(self.frames)
        return [
            f for f in self.frames
            if all(f + k in present for k in range(WINDOW))
            and mel_start(f, offset_frames) >= 0
            and mel_start(f + WINDOW - 1, offset_frames) + MEL_STEP <= self.mel.shape[1]
        ]


def read_filelist(root: Path, split: str) -> list[str]:
    """Clip paths listed in ``root/<split>.txt`` (first token per line; blank lines ignored)."""
    listing = root / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"{listing} does not exist; run `python -m data.preprocess` on your "
                        f"videos, or point data.root at a preprocessed folder")
    entries = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not entries:
        raise DataError(f"{listing} lists no clips; preprocess at least one video into {root}")
    return entries


def load_clip(clip_dir: Path) -> Clip:
    """Index a clip folder's frames and compute its mel once."""
    if not clip_dir.is_dir():
        raise DataError(f"clip folder {clip_dir} listed in the filelist does not exist")
    frames = sorted(int(p.stem) for p in clip_dir.glob("*.jpg") if p.stem.isdigit())
    audio = clip_dir / "audio.wav"
    if not audio.is_file():
        raise DataError(f"clip {clip_dir} has no audio.wav; preprocess it again")
    return Clip(clip_dir, frames, melspectrogram(load_audio(audio)))


class WindowDataset(Dataset):
    """Random training windows over a set of clips; ``length`` samples per epoch.

    With ``deterministic`` (validation) sample ``i`` is always the same window.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        length: int,
        mel_offset_frames: int = -1,
        deterministic: bool = False,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.length = length
        self.offset = mel_offset_frames
        self.deterministic = deterministic
        self.seed = seed
        self.clips: list[Clip] = []
        self.starts: list[list[int]] = []
        too_short = []
        for entry in read_filelist(self.root, split):
            clip = load_clip(self.root / entry)
            starts = clip.window_starts(self.offset)
            # A window plus a reference window elsewhere needs more than three windows of frames,
            # the same rule the original applies (it skips clips with 15 frames or fewer).
            if len(clip.frames) <= 3 * WINDOW or len(starts) < 2:
                too_short.append(f"{entry} ({len(clip.frames)} frames)")
                continue
            self.clips.append(clip)
            self.starts.append(starts)
        if too_short:
            log.warning("skipping %d clips too short for a window plus a reference: %s",
                        len(too_short), ", ".join(too_short[:5]))
        if not self.clips:
            raise DataError(
                f"no usable clip in {self.root / (split + '.txt')}: every clip is too short "
                f"({', '.join(too_short[:3])}); each needs more than {3 * WINDOW} face frames "
                f"at 25 fps and audio covering them"
            )

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + index) if self.deterministic else random

    def _read_window(self, clip: Clip, start: int) -> np.ndarray:
        frames = []
        for k in range(WINDOW):
            image = cv2.imread(str(clip.path / f"{start + k}.jpg"))
            if image is None:
                raise DataError(f"cannot read {clip.path / f'{start + k}.jpg'}; re-run preprocess")
            frames.append(cv2.resize(image, (IMG_SIZE, IMG_SIZE)))
        # (T, H, W, 3) BGR uint8 -> (3, T, H, W) float in [0, 1], no mean/std as in the original.
        return np.stack(frames).transpose(3, 0, 1, 2).astype(np.float32) / 255.0

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        which = rng.randrange(len(self.clips))
        clip, starts = self.clips[which], self.starts[which]
        start = rng.choice(starts)
        reference = rng.choice([s for s in starts if s != start])

        target = self._read_window(clip, start)
        masked = target.copy()
        masked[:, :, IMG_SIZE // 2:] = 0.0
        face = np.concatenate([masked, self._read_window(clip, reference)], axis=0)
        mels = torch.stack([
            clip.mel[:, mel_start(start + k, self.offset):][:, :MEL_STEP] for k in range(WINDOW)
        ]).unsqueeze(1)
        return {"face": torch.from_numpy(face), "mel": mels, "target": torch.from_numpy(target)}


class Wav2LipDataModule(L.LightningDataModule):
    """Train/val windows from a preprocessed root; ``synthetic`` generates a tiny sample first."""

    def __init__(
        self,
        root: str,
        batch_size: int = 4,
        num_workers: int = 0,
        train_samples: int = 256,
        val_samples: int = 16,
        mel_offset_frames: int = -1,
        synthetic: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.train_set: WindowDataset | None = None
        self.val_set: WindowDataset | None = None

    def prepare_data(self) -> None:
        if self.hparams.synthetic and not (self.root / "train.txt").is_file():
            from data.synthetic import make_synthetic_dataset

            make_synthetic_dataset(self.root, seed=self.hparams.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.root.is_dir():
            raise DataError(f"data root {self.root} does not exist; set data.root to a "
                            f"preprocessed folder (python -m data.preprocess)")
        hp = self.hparams
        self.train_set = WindowDataset(self.root, "train", hp.train_samples, hp.mel_offset_frames)
        val_split = "val" if (self.root / "val.txt").is_file() else "train"
        self.val_set = WindowDataset(self.root, val_split, hp.val_samples, hp.mel_offset_frames,
                                     deterministic=True, seed=hp.seed)
        log.info("data: %d train clips, %d val clips from %s",
                 len(self.train_set.clips), len(self.val_set.clips), self.root)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, drop_last=False,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
