"""Wav2Lip training windows from the LRS2-style layout, and the LightningDataModule around them.

Layout: ``root/<clip>/<i>.jpg`` face crops indexed on a 25 fps timeline (missing indices are
frames without a face) plus ``root/<clip>/audio.wav`` (16 kHz mono, sample 0 at index 0);
``root/{train,val,test}.txt`` list clip paths relative to ``root``. Windowing follows the original
training code: 5 consecutive frames, the lower half of the input window zeroed, a reference window
from another time of the same clip, BGR in [0, 1], and one 16-column mel window per frame.

Each clip's mel is computed once and cached as ``mel.npy`` beside its audio. ``format: packed``
reads the frames from ``frames.npy`` (uint8, N x 96 x 96 x 3, memory-mapped; written by
``python -m data.pack``) instead of decoding ten JPEGs per sample.

Alignment convention. Timeline index ``i`` stands for the instant ``i / 25`` s. Mel column ``c`` is
the STFT frame centred on audio sample ``200 c`` (centred, reflect-padded STFT, hop 200 at
16 kHz), i.e. on ``c / 80`` s, so a sound at ``t`` s peaks in column ``round(80 t)`` and the
instant of frame ``i`` is column ``round(3.2 i)``. Frame ``i``'s 16-column (200 ms) window starts
at column ``mel_start(i, offset) = floor(80 (i + offset) / 25)``; ``offset`` (``data.
mel_offset_frames``) is -1 for the original's training (the window starts one frame early, so the
frame's instant is column 3 or 4 of its window, see ``frame_instant_column``) and 0 for its
inference (column 0 or 1).

Sync windows. Every sample also carries ``sync_mel`` (1, 80, 16), the mel window the expert
SyncNet scores the 5 frames against: 16 columns from ``mel_start(start, 0)``, the offset its
training used, whatever ``mel_offset_frames`` is. With ``sync_offsets`` K > 0 a sample also
carries ``sync_mels`` (2K+1, 1, 80, 16), the windows for start frames ``start - K .. start + K``
(row K is ``sync_mel``), for LSE-D / LSE-C style scores (``models.sync_scores``); only windows
whose every offset fits inside the clip's mel are drawn then.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.audio import FPS, MEL_PER_SECOND, MEL_STEP, N_MELS, load_audio, melspectrogram

log = logging.getLogger(__name__)

MEL_PER_FRAME = MEL_PER_SECOND / FPS  # 3.2 mel columns per video frame
WINDOW = 5  # frames per training window (syncnet_T in the original)
IMG_SIZE = 96
FORMATS = ("jpg", "packed")
MEL_CACHE = "mel.npy"
PACKED_FRAMES = "frames.npy"
PACKED_INDEX = "frames_index.npy"


class DataError(ValueError):
    """The data folder cannot feed training; the message names what to fix."""


def mel_start(frame: int, offset_frames: int) -> int:
    """First mel column of the 16-column window for video ``frame``.

    ``offset_frames`` shifts the window in video frames: -1 reproduces the original's training
    (each frame's window starts one frame earlier), 0 its inference. Computed exactly in integers
    as ``int(80 * (frame + offset_frames) / 25)``, the original's formula.
    """
    n = MEL_PER_SECOND * (frame + offset_frames)
    return n // FPS if n >= 0 else -(-n // FPS)


def frame_instant_column(frame: int, offset_frames: int) -> int:
    """Column, within ``frame``'s own mel window, of the frame's instant ``frame / 25`` s.

    The instant is clip column ``round(3.2 * frame)`` (never a tie: 3.2 * frame has a fractional
    part in {0, .2, .4, .6, .8}). With offset -1 this is 3 or 4; with offset 0, 0 or 1.
    """
    return (2 * MEL_PER_SECOND * frame + FPS) // (2 * FPS) - mel_start(frame, offset_frames)


@dataclass
class Clip:
    """One preprocessed clip: its frame indices and its normalised mel (80, T)."""

    path: Path
    frames: list[int]
    mel: torch.Tensor
    positions: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.positions = {f: k for k, f in enumerate(self.frames)}

    def window_starts(self, offset_frames: int, sync_offsets: int = 0) -> list[int]:
        """Frames that start 5 consecutive existing frames whose mel windows all fit.

        The expert's windows (offset 0, start frames ``f - sync_offsets .. f + sync_offsets``)
        must fit too; with ``offset_frames >= -4`` and no sync offsets that adds no condition.
        """
        present = self.positions
        columns = self.mel.shape[1]
        return [
            f for f in self.frames
            if all(f + k in present for k in range(WINDOW))
            and mel_start(f, offset_frames) >= 0
            and mel_start(f + WINDOW - 1, offset_frames) + MEL_STEP <= columns
            and mel_start(f - sync_offsets, 0) >= 0
            and mel_start(f + sync_offsets, 0) + MEL_STEP <= columns
        ]


def read_filelist(root: Path, split: str) -> list[str]:
    """Clip paths listed in ``root/<split>.txt`` (first token per line; blank lines ignored).

    Raises:
        DataError: The filelist is missing, empty, or names clip folders that do not exist.
    """
    listing = root / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"{listing} does not exist; run `python -m data.preprocess` on your "
                        f"videos, or point data.root at a preprocessed folder")
    entries = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not entries:
        raise DataError(f"{listing} lists no clips; preprocess at least one video into {root}")
    missing = [e for e in entries if not (root / e).is_dir()]
    if missing:
        raise DataError(f"{len(missing)} of {len(entries)} clips listed in {listing} are missing "
                        f"(e.g. {', '.join(missing[:3])}); re-run preprocessing or fix the list")
    return entries


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` under a temporary name, then rename it into place."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    np.save(tmp, array)
    os.replace(tmp, path)


def load_mel(clip_dir: Path) -> torch.Tensor:
    """The clip's mel (80, T) from ``mel.npy``, computed from ``audio.wav`` and cached if needed.

    A cache older than ``audio.wav`` or of the wrong shape is recomputed. A read-only data folder
    only loses the cache, not the mel.
    """
    audio = clip_dir / "audio.wav"
    if not audio.is_file():
        raise DataError(f"clip {clip_dir} has no audio.wav; preprocess it again")
    cache = clip_dir / MEL_CACHE
    try:
        if cache.stat().st_mtime_ns >= audio.stat().st_mtime_ns:
            mel = np.load(cache)
            if mel.ndim == 2 and mel.shape[0] == N_MELS and mel.dtype == np.float32:
                return torch.from_numpy(mel)
    except (OSError, ValueError):
        pass
    mel = melspectrogram(load_audio(audio))
    try:
        save_npy_atomic(cache, mel.numpy())
    except OSError as exc:
        log.debug("cannot cache the mel of %s: %s", clip_dir, exc)
    return mel


def packed_index(clip_dir: Path) -> np.ndarray | None:
    """Frame indices of a complete packed clip, or None when it is not packed."""
    try:
        index = np.load(clip_dir / PACKED_INDEX)
        frames = np.load(clip_dir / PACKED_FRAMES, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if frames.shape != (len(index), IMG_SIZE, IMG_SIZE, 3) or frames.dtype != np.uint8:
        return None
    return index


def load_clip(clip_dir: Path, data_format: str = "jpg") -> Clip:
    """Index a clip folder's frames (JPEG names or the packed index) and load its mel."""
    if not clip_dir.is_dir():
        raise DataError(f"clip folder {clip_dir} listed in the filelist does not exist")
    if data_format == "packed":
        index = packed_index(clip_dir)
        if index is None:
            raise DataError(f"clip {clip_dir} is not packed; run `python -m data.pack "
                            f"{clip_dir.parent}` or set data.format=jpg")
        frames = [int(i) for i in index]
    else:
        frames = sorted(int(p.stem) for p in clip_dir.glob("*.jpg") if p.stem.isdigit())
    return Clip(clip_dir, frames, load_mel(clip_dir))


class WindowDataset(Dataset):
    """Random training windows over a set of clips; ``length`` samples per epoch.

    With ``deterministic`` (validation) sample ``i`` is always the same window. ``data_format``
    picks JPEG folders (``jpg``) or the memory-mapped ``frames.npy`` of each clip (``packed``).
    ``sync_offsets`` K > 0 adds ``sync_mels`` (2K+1 expert mel windows, offsets -K..K frames) to
    every sample and draws only windows where all of them fit (see the module docstring).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        length: int,
        mel_offset_frames: int = -1,
        deterministic: bool = False,
        seed: int = 0,
        data_format: str = "jpg",
        sync_offsets: int = 0,
    ) -> None:
        if data_format not in FORMATS:
            raise DataError(f"data.format must be one of {', '.join(FORMATS)}, got "
                            f"{data_format!r}")
        if isinstance(sync_offsets, bool) or not isinstance(sync_offsets, int) or sync_offsets < 0:
            raise DataError(f"data.sync_offsets must be an int >= 0 (frames each way), got "
                            f"{sync_offsets!r}")
        self.root = Path(root)
        self.length = length
        self.offset = mel_offset_frames
        self.deterministic = deterministic
        self.seed = seed
        self.data_format = data_format
        self.sync_offsets = sync_offsets
        self.clips: list[Clip] = []
        self.starts: list[list[int]] = []
        self._mels: list[np.ndarray] = []
        self._packed: dict[Path, np.ndarray] = {}  # opened lazily, once per worker process
        too_short = []
        for entry in read_filelist(self.root, split):
            clip = load_clip(self.root / entry, data_format)
            starts = clip.window_starts(self.offset, sync_offsets)
            # A window plus a reference window elsewhere needs more than three windows of frames,
            # the same rule the original applies (it skips clips with 15 frames or fewer).
            if len(clip.frames) <= 3 * WINDOW or len(starts) < 2:
                too_short.append(f"{entry} ({len(clip.frames)} frames)")
                continue
            self.clips.append(clip)
            self.starts.append(starts)
            self._mels.append(clip.mel.numpy())
        if too_short:
            log.warning("skipping %d clips too short for a window plus a reference: %s",
                        len(too_short), ", ".join(too_short[:5]))
        if not self.clips:
            extra = (f", and {sync_offsets} frames of audio each side of a window for "
                     f"sync_offsets={sync_offsets}" if sync_offsets else "")
            raise DataError(
                f"no usable clip in {self.root / (split + '.txt')}: every clip is too short "
                f"({', '.join(too_short[:3])}); each needs more than {3 * WINDOW} face frames "
                f"at 25 fps and audio covering them{extra}"
            )

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + index) if self.deterministic else random

    def _read_window(self, clip: Clip, start: int) -> np.ndarray:
        """The 5 frames from ``start`` as (3, T, H, W) BGR floats in [0, 1]."""
        out = np.empty((3, WINDOW, IMG_SIZE, IMG_SIZE), np.float32)
        self._fill_window(clip, start, out)
        return out

    def _fill_window(self, clip: Clip, start: int, out: np.ndarray) -> None:
        if self.data_format == "packed":
            frames = self._packed.get(clip.path)
            if frames is None:
                frames = np.load(clip.path / PACKED_FRAMES, mmap_mode="r")
                self._packed[clip.path] = frames
            pos = clip.positions[start]
            window = frames[pos:pos + WINDOW]
        else:
            images = []
            for k in range(WINDOW):
                image = cv2.imread(str(clip.path / f"{start + k}.jpg"))
                if image is None:
                    raise DataError(f"cannot read {clip.path / f'{start + k}.jpg'}; re-run "
                                    f"preprocessing")
                images.append(cv2.resize(image, (IMG_SIZE, IMG_SIZE)))
            window = np.stack(images)
        # (T, H, W, 3) BGR uint8 -> (3, T, H, W) float in [0, 1], no mean/std as in the original;
        # written in place, since these copies are most of a packed sample's cost.
        np.divide(window.transpose(3, 0, 1, 2), np.float32(255.0), out=out)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        which = rng.randrange(len(self.clips))
        clip, starts = self.clips[which], self.starts[which]
        start = rng.choice(starts)
        reference = rng.choice([s for s in starts if s != start])

        face = np.empty((6, WINDOW, IMG_SIZE, IMG_SIZE), np.float32)
        self._fill_window(clip, start, face[:3])
        self._fill_window(clip, reference, face[3:])
        target = face[:3].copy()
        face[:3, :, IMG_SIZE // 2:] = 0.0
        mel = self._mels[which]
        mels = np.stack([
            mel[:, mel_start(start + k, self.offset):][:, :MEL_STEP] for k in range(WINDOW)
        ])[:, None]
        sync = mel_start(start, 0)
        sample = {"face": torch.from_numpy(face), "mel": torch.from_numpy(mels),
                  "target": torch.from_numpy(target),
                  "sync_mel": torch.from_numpy(np.ascontiguousarray(
                      mel[None, :, sync:sync + MEL_STEP]))}
        if self.sync_offsets:
            k = self.sync_offsets
            sample["sync_mels"] = torch.from_numpy(np.stack([
                mel[:, mel_start(start + shift, 0):][:, :MEL_STEP] for shift in range(-k, k + 1)
            ])[:, None])
        return sample


class Wav2LipDataModule(L.LightningDataModule):
    """Train/val windows from a preprocessed root; ``synthetic`` generates a tiny sample first.

    ``data_format`` (config key ``format``) is ``jpg`` or ``packed``; with ``packed``,
    ``prepare_data`` packs any clip that is not packed yet (``python -m data.pack`` does the same
    ahead of time). ``sync_offsets`` applies to validation samples only (see
    :class:`WindowDataset`); training samples always carry ``sync_mel`` alone.
    """

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
        format: str = "jpg",  # shadows the builtin: it is the config key users write
        sync_offsets: int = 0,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise DataError(f"data.format must be one of {', '.join(FORMATS)}, got {format!r}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.train_set: WindowDataset | None = None
        self.val_set: WindowDataset | None = None

    def prepare_data(self) -> None:
        if self.hparams.synthetic and not (self.root / "train.txt").is_file():
            from data.synthetic import make_synthetic_dataset

            make_synthetic_dataset(self.root, seed=self.hparams.seed)
        if self.hparams.format == "packed" and (self.root / "train.txt").is_file():
            from data.pack import pack_root

            pack_root(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.root.is_dir():
            raise DataError(f"data root {self.root} does not exist; set data.root to a "
                            f"preprocessed folder (python -m data.preprocess)")
        hp = self.hparams
        self.train_set = WindowDataset(self.root, "train", hp.train_samples, hp.mel_offset_frames,
                                       data_format=hp.format)
        val_split = "val" if (self.root / "val.txt").is_file() else "train"
        self.val_set = WindowDataset(self.root, val_split, hp.val_samples, hp.mel_offset_frames,
                                     deterministic=True, seed=hp.seed, data_format=hp.format,
                                     sync_offsets=hp.sync_offsets)
        log.info("data: %d train clips, %d val clips (%s) from %s", len(self.train_set.clips),
                 len(self.val_set.clips), hp.format, self.root)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, drop_last=False,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
