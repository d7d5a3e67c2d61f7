"""Pack preprocessed clips for fast loading: one uint8 frame array and one cached mel per clip.

For every clip listed in ``ROOT/{train,val,test}.txt`` this writes ``frames.npy`` (uint8,
N x 96 x 96 x 3 BGR, each face crop already resized as the dataset would), ``frames_index.npy``
(the timeline index of each row) and ``mel.npy``. The dataset memory-maps ``frames.npy`` under
``data.format=packed``, so a sample costs two array slices instead of ten JPEG decodes. Files are
written under temporary names and renamed, the index last, so an interrupted run leaves no clip
that looks packed but is not; re-runs skip packed clips.

Usage: ``python -m data.pack ROOT [--workers N]``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import multiprocessing
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from data.dataset import (
    IMG_SIZE,
    PACKED_FRAMES,
    PACKED_INDEX,
    DataError,
    load_mel,
    packed_index,
    read_filelist,
    save_npy_atomic,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def pack_clip(clip_dir: Path) -> bool:
    """Pack one clip folder unless it is already packed; returns whether it wrote anything.

    Raises:
        DataError: The folder has no frames or a frame cannot be read.
    """
    clip_dir = Path(clip_dir)
    load_mel(clip_dir)  # caches mel.npy beside the audio
    frames = sorted(int(p.stem) for p in clip_dir.glob("*.jpg") if p.stem.isdigit())
    index = packed_index(clip_dir)
    if index is not None and index.tolist() == frames:
        return False
    if not frames:
        raise DataError(f"clip {clip_dir} has no <i>.jpg frames; preprocess it again")
    packed = np.empty((len(frames), IMG_SIZE, IMG_SIZE, 3), np.uint8)
    for row, i in enumerate(frames):
        image = cv2.imread(str(clip_dir / f"{i}.jpg"))
        if image is None:
            raise DataError(f"cannot read {clip_dir / f'{i}.jpg'}; re-run preprocessing")
        packed[row] = cv2.resize(image, (IMG_SIZE, IMG_SIZE))
    save_npy_atomic(clip_dir / PACKED_FRAMES, packed)
    save_npy_atomic(clip_dir / PACKED_INDEX, np.asarray(frames, np.int32))
    return True


def listed_clips(root: Path) -> list[str]:
    """Every clip named in the root's filelists, each once, in order.

    Raises:
        DataError: No filelist, or a filelist names a missing clip.
    """
    names: list[str] = []
    for split in SPLITS:
        listing = root / f"{split}.txt"
        if listing.is_file() and listing.read_text().strip():  # an empty split adds nothing
            names.extend(n for n in read_filelist(root, split) if n not in names)
    if not names:
        raise DataError(f"no train.txt, val.txt or test.txt in {root}; run "
                        f"`python -m data.preprocess` first")
    return names


def pack_root(root: str | Path, workers: int = 1, progress: bool = False) -> tuple[int, int]:
    """Pack every listed clip of ``root``; the filelists are checked before anything is written.

    Returns:
        Clips packed now and clips that were already packed.
    """
    root = Path(root)
    names = listed_clips(root)
    bar = tqdm(total=len(names), unit="clip", desc="pack", disable=not progress)
    written = 0
    if workers > 1:
        # Spawned, not forked: forking a process with busy torch threads can deadlock.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, context) as pool:
            for did in pool.map(pack_clip, [root / n for n in names]):
                written += did
                bar.update()
    else:
        for name in names:
            written += pack_clip(root / name)
            bar.update()
    bar.close()
    log.info("packed %d clips, %d already packed, in %s", written, len(names) - written, root)
    return written, len(names) - written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m data.pack",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a folder made by python -m data.preprocess")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        written, skipped = pack_root(args.root, args.workers, progress=True)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"packed {written} clips ({skipped} already packed) in {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
