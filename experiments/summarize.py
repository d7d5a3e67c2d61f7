"""Summarise finished training runs from their CSV logs: final metrics per run, mean and spread
over seeds, and the validation curves as one PNG.

    python experiments/summarize.py /work/runs --group '(.*)_s\\d+$' --out runs_summary

Runs are folders holding ``csv/version_*/metrics.csv`` (``logger=[wandb,csv]`` writes them);
a run resumed from a checkpoint has several versions, read in order. Runs whose names match the
same ``--group`` capture are seeds of one configuration.
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import statistics
import sys
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("val/psnr_teacher", "val/psnr_gt")


def read_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric of ``run`` as (step, value) pairs, across resumed versions."""
    curves: dict[str, dict[int, float]] = {}
    versions = sorted((run / "csv").glob("version_*/metrics.csv"),
                      key=lambda p: int(p.parent.name.split("_")[1]))
    for path in versions:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                for key, value in row.items():
                    if key not in ("epoch", "step") and value not in ("", None):
                        curves.setdefault(key, {})[int(row["step"])] = float(value)
    return {key: sorted(points.items()) for key, points in curves.items()}


def group_runs(root: Path, pattern: str) -> dict[str, list[Path]]:
    """Run folders under ``root`` grouped by the first capture of ``pattern`` on their name."""
    groups: dict[str, list[Path]] = {}
    for run in sorted(p for p in root.iterdir() if (p / "csv").is_dir()):
        match = re.match(pattern, run.name)
        groups.setdefault(match.group(1) if match else run.name, []).append(run)
    return groups


def summarize(groups: dict[str, list[Path]], metrics: tuple[str, ...]) -> list[dict]:
    """One row per group: each metric's final value per seed, their mean and half-range."""
    rows = []
    for name, runs in groups.items():
        row: dict = {"config": name, "seeds": len(runs)}
        for metric in metrics:
            finals = [curve[-1][1] for run in runs if (curve := read_curves(run).get(metric))]
            row[metric] = finals
        rows.append(row)
    return rows


def format_table(rows: list[dict], metrics: tuple[str, ...]) -> str:
    """Markdown table: mean +- half the spread between seeds, and the seeds' values."""
    head = "| config | seeds | " + " | ".join(metrics) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(metrics)]
    for row in rows:
        cells = []
        for metric in metrics:
            values = row[metric]
            if not values:
                cells.append("n/a")
                continue
            mean = statistics.fmean(values)
            half = (max(values) - min(values)) / 2
            seeds = ", ".join(f"{v:.2f}" for v in values)
            cells.append(f"{mean:.2f} ± {half:.2f} ({seeds})")
        lines.append(f"| {row['config']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(groups: dict[str, list[Path]], metrics: tuple[str, ...], path: Path) -> None:
    """One panel per metric, one line per run: a colour per configuration, a dash per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, metric in zip(axes[0], metrics):
        for index, runs in enumerate(groups.values()):
            for seed, run in enumerate(runs):
                curve = read_curves(run).get(metric)
                if curve:
                    steps, values = zip(*curve)
                    axis.plot(steps, values, marker="o", markersize=3, label=run.name,
                              color=colours[index % len(colours)],
                              linestyle=("-", "--", ":")[seed % 3])
        axis.set_xlabel("step")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder of run folders")
    parser.add_argument("--group", default=r"(.*)_s\d+$",
                        help="regex whose first group names a configuration (seeds share it)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.png")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        sys.exit(f"error: {args.root} is not a folder; give the folder holding the run folders")
    groups = group_runs(args.root, args.group)
    if not groups:
        sys.exit(f"error: no run with csv logs under {args.root}; train with "
                 "'logger=[wandb,csv]'")
    metrics = tuple(args.metrics)
    table = format_table(summarize(groups, metrics), metrics)
    print(table)
    if args.out:
        args.out.with_suffix(".md").write_text(table + "\n")
        plot_curves(groups, metrics, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
