"""Frames per second of the Wav2Lip teacher and each student preset, per backend, on this CPU.

Usage::

    .venv/bin/python benchmark.py                   # everything: about 15 minutes on 2 cores
    .venv/bin/python benchmark.py --presets nota_like --backends compile_bf16 --batches 128

Writes ``results.json``, ``results.md`` and ``throughput.png`` (plus each backend's artifact
under ``artifacts/``) into ``--output-dir`` (default ``outputs/benchmark/<time>``). The logic is
in :mod:`compress.benchmark`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from compress.benchmark import (
    BACKENDS,
    BF16_MODES,
    BenchmarkConfig,
    default_output_dir,
    format_table,
    run_benchmark,
    usable_cores,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the benchmark and print its markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=[],
                        help="student presets in conf/student (default: all but full)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 128])
    parser.add_argument("--threads", type=int, default=None,
                        help=f"PyTorch and ONNX Runtime threads (default all {usable_cores()})")
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds of timed repeats per measurement, after warm-up")
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--max-repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--bf16-mode", default="weights", choices=BF16_MODES,
                        help="compile_bf16: cast the weights, or run fp32 weights under autocast")
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bound", dest="bound", action="store_false",
                        help="skip width1, the one-channel network that bounds every preset")
    parser.add_argument("--chunk", type=int, default=64,
                        help="students run larger batches in calls of at most this many frames "
                             "(0: one call per batch; the teacher always runs in one call)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Export and quantization log every pass; the benchmark's own lines are what matter here.
    for noisy in ("torch", "onnxscript", "onnx_ir", "compress.quantize", "compress.fold",
                  "compress.onnx_export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = BenchmarkConfig(
            presets=tuple(args.presets), backends=tuple(args.backends),
            batches=tuple(args.batches), threads=args.threads, budget_s=args.budget,
            min_repeats=args.min_repeats, max_repeats=args.max_repeats, warmup=args.warmup,
            bf16_mode=args.bf16_mode, output_dir=args.output_dir or default_output_dir(),
            seed=args.seed, bound=args.bound, chunk=args.chunk or None,
        )
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"threads: {cfg.threads or usable_cores()}; writing to {cfg.output_dir}", flush=True)
    report = run_benchmark(cfg)
    print(format_table(report))
    print(f"results: {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
