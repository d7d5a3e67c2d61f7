"""Training samples per second for each data format and DataLoader worker count.

Loads the same random windows through ``WindowDataset`` from JPEG folders (``format: jpg``, ten
JPEG decodes and resizes per sample, as the original) and from packed clips (``format: packed``,
memory-mapped uint8 arrays), with 0, 1 and 2 workers, and prints a table. By default it
preprocesses the real sample videos in ``../shared/samples`` (face crops of about 250-370 px,
as 720p-1080p footage gives), else it uses the generated sample (128 px crops).

Usage: ``python benchmarks/data_loading.py [--root PREPARED_ROOT] [--samples 800]``
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.dataset import DataError, WindowDataset
from data.pack import pack_root

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
VIDEOS = ("vid_retalking2_844sq_25fps.mp4", "vid_retalking4_700sq_30fps.mp4",
          "vid_sadtalker_katiehill_512_mpeg4.mp4")


def prepare(work: Path) -> tuple[Path, str]:
    """A preprocessed root with every clip in train.txt, and a description of it."""
    videos = [SAMPLES / v for v in VIDEOS if (SAMPLES / v).is_file()]
    root = work / "prepared"
    if videos:
        from data.preprocess import preprocess

        preprocess(videos, root, val_fraction=0.0, test_fraction=0.0, workers=2)
        (root / "train.txt").write_text("".join(f"{v.stem}\n" for v in videos))
        return root, f"{len(videos)} real sample clips"
    from data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(root, n_clips=6, n_val=0)
    return root, "generated sample (128 px crops)"


def measure(
    root: Path, data_format: str, workers: int, samples: int, batch: int, repeats: int = 3
) -> float:
    """Best samples per second of ``repeats`` passes over ``samples`` samples.

    Each pass starts timing after one warm-up batch (worker start-up and first file opens are
    not throughput); the best pass is reported because other jobs on a shared machine only ever
    slow a pass down.
    """
    dataset = WindowDataset(root, "train", samples + batch, data_format=data_format)
    best = 0.0
    for _ in range(repeats):
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False)
        batches = iter(loader)
        next(batches)
        start = time.perf_counter()
        count = sum(len(b["face"]) for b in batches)
        best = max(best, count / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> int:
    """Print samples/s for jpg and packed at 0, 1 and 2 workers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="a preprocessed root to use")
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="passes; the best is shown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        run(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    """Prepare or reuse a root, pack it, and print samples per second per format and workers."""
    with tempfile.TemporaryDirectory() as tmp:
        root, what = (args.root, str(args.root)) if args.root else prepare(Path(tmp))
        pack_root(root)
        print(f"data: {what}; {args.samples} samples, batch {args.batch_size}")
        print(f"{'workers':>7}  {'jpg samples/s':>13}  {'packed samples/s':>16}  {'speed-up':>8}")
        for workers in args.workers:
            jpg = measure(root, "jpg", workers, args.samples, args.batch_size, args.repeats)
            packed = measure(root, "packed", workers, args.samples, args.batch_size, args.repeats)
            print(f"{workers:>7}  {jpg:>13.0f}  {packed:>16.0f}  {packed / jpg:>7.1f}x")


if __name__ == "__main__":
    sys.exit(main())
