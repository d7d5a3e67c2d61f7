"""Evaluate a teacher, students and exported programs side by side; print and write one table.

    python eval.py /data/prepared --teacher wav2lip_gan.pth \\
        --student runs/a/export/student.pt --student runs/b/export/student.pt \\
        --program runs/a/export/student_int8.pt2 --syncnet lipsync_expert.pth --out table.md

Columns and conventions: see compress/evaluate.py and the README's "Evaluation" section.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from compress.evaluate import EvalError, EvalSettings, evaluate_files

OUT_SUFFIXES = (".md", ".json")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see ``python eval.py --help``."""
    defaults = EvalSettings()
    parser = argparse.ArgumentParser(prog="python eval.py", description=__doc__.splitlines()[0])
    parser.add_argument("data_root", help="preprocessed data folder (python -m data.preprocess)")
    parser.add_argument("--split", default=defaults.split, help="filelist to use (default test)")
    parser.add_argument("--teacher", help="reference generator: released .pth or student.pt")
    parser.add_argument("--student", action="append", default=[],
                        help="student.pt or Lightning .ckpt; may repeat")
    parser.add_argument("--program", action="append", default=[],
                        help="exported .pt2 (fp32 or int8) or .onnx; may repeat")
    parser.add_argument("--syncnet", help="expert SyncNet (lipsync_expert.pth) for LSE-D / LSE-C")
    parser.add_argument("--samples", type=int, default=defaults.samples,
                        help="windows of 5 frames to evaluate")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="windows per forward pass")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="window selection seed")
    parser.add_argument("--sync-offsets", type=int, default=defaults.sync_offsets,
                        help="audio offsets searched each way, in frames (default 15)")
    parser.add_argument("--mel-offset-frames", type=int, default=defaults.mel_offset_frames,
                        help="mel window offset the models were trained with (default -1)")
    parser.add_argument("--format", default=defaults.data_format, choices=("jpg", "packed"),
                        help="frame storage of the data root")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's count)")
    parser.add_argument("--fps-frames", type=int, default=defaults.fps_frames,
                        help="frames per timed batch")
    parser.add_argument("--fps-runs", type=int, default=defaults.fps_runs,
                        help="timed runs after a warm-up; 0 skips timing")
    parser.add_argument("--out", action="append", default=[], type=Path,
                        help="write the table to a .md or .json file; may repeat")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; returns the exit code (1 with a one-line error on bad input)."""
    args = parse_args(argv)
    try:
        bad = [p for p in args.out if p.suffix not in OUT_SUFFIXES]
        if bad:
            raise EvalError(f"--out {bad[0]} must end in .md or .json")
        settings = EvalSettings(
            split=args.split, samples=args.samples, batch_size=args.batch_size, seed=args.seed,
            mel_offset_frames=args.mel_offset_frames, sync_offsets=args.sync_offsets,
            data_format=args.format, threads=args.threads, fps_frames=args.fps_frames,
            fps_runs=args.fps_runs)
        table = evaluate_files(args.data_root, settings, args.teacher, args.student,
                               args.program, args.syncnet)
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    text = table.markdown()
    print(text, end="")
    for path in args.out:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if path.suffix == ".md" else table.to_json())
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
