"""Evaluate a teacher, students and exported programs side by side on one data split.

Every model sees the same windows (validation-style: lower half of the target masked, a reference
window from another time of the clip, drawn deterministically from ``seed``) and is compared
with the teacher's output and with the ground truth. One table row per model:

- ``parameters``: parameter elements of a float model; for an exported program, the elements of
  the conv weights and biases it computes with (BatchNorm is folded into them, so a little fewer
  than its float student's). ``n/a`` for ONNX files.
- GMACs per 96x96 frame, convolutions only, transposed convolutions counted by output positions
  (thop's convention) and by input positions (the true multiplies), as
  :mod:`compress.complexity`; for a program, counted from the convolutions it runs.
- PSNR of the lower half (rows 48-95, the generated mouth region) and of the whole frame, pooled
  over all evaluated frames (10 log10(1 / MSE)), and SSIM of the lower half
  (:func:`compress.metrics.ssim_index`: torchmetrics, 11x11 Gaussian window, data range 1),
  averaged over frames; each against
  the teacher's output and against the ground truth. A model compared with itself gives inf.
- LSE-D / LSE-C and the best audio offset with an expert SyncNet (:mod:`models.sync_scores`:
  Wav2Lip's expert, comparable between our models only); a ``ground truth`` row scores the
  real frames.
- Frames per second on a batch of ``fps_frames`` frames at a fixed thread count: the median of
  ``fps_runs`` timed runs after one warm-up, measured in the same process.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from compress.eval_models import (
    Candidate,
    EvalError,
    Runner,
    check_file,
    load_candidates,
    model_entries,
)
from compress.metrics import lower_half, ssim_index
from data.dataset import FORMATS, IMG_SIZE, WINDOW, DataError, WindowDataset
from models.checkpoint import CheckpointError
from models.sync_scores import best_offset, lse_scores, sync_distances
from models.syncnet import load_syncnet

__all__ = [
    "COLUMNS",
    "EvalError",
    "EvalSettings",
    "EvalTable",
    "evaluate",
    "evaluate_files",
    "open_split",
]

log = logging.getLogger(__name__)

LOWER = IMG_SIZE // 2  # first row of the generated (masked) half
GROUND_TRUTH = "ground truth"
# Table columns: JSON key, markdown heading, format; None values print as n/a.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", "s"),
    ("type", "type", "s"),
    ("parameters", "parameters", ",d"),
    ("gmacs_convt_output", "GMACs/frame (convT by output)", ".3f"),
    ("gmacs_convt_input", "GMACs/frame (convT by input)", ".3f"),
    ("psnr_lower_teacher", "PSNR lower vs teacher", ".2f"),
    ("ssim_lower_teacher", "SSIM lower vs teacher", ".4f"),
    ("psnr_full_teacher", "PSNR full vs teacher", ".2f"),
    ("psnr_lower_gt", "PSNR lower vs GT", ".2f"),
    ("ssim_lower_gt", "SSIM lower vs GT", ".4f"),
    ("psnr_full_gt", "PSNR full vs GT", ".2f"),
    ("lse_d", "LSE-D", ".3f"),
    ("lse_c", "LSE-C", ".3f"),
    ("sync_offset", "offset", "+d"),
    ("fps", "frames/s", ".1f"),
)
_TEACHER_COLUMNS = ("psnr_lower_teacher", "ssim_lower_teacher", "psnr_full_teacher")
_SYNC_COLUMNS = ("lse_d", "lse_c", "sync_offset")

@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate on and how to time it.

    Args:
        split: Filelist of the data root (``<split>.txt``).
        samples: Windows of 5 frames to evaluate.
        batch_size: Windows per forward pass.
        seed: Seed of the deterministic window selection.
        mel_offset_frames: The generators' mel window offset (-1: the original's training).
        sync_offsets: Audio offsets K each way for LSE-D / LSE-C (used with an expert only).
        data_format: ``jpg`` or ``packed`` frames.
        threads: CPU threads for torch and ONNX Runtime; None keeps torch's current count.
        fps_frames: Frames per timed batch.
        fps_runs: Timed runs after the warm-up; 0 skips the speed measurement.
    """

    split: str = "test"
    samples: int = 128
    batch_size: int = 8
    seed: int = 0
    mel_offset_frames: int = -1
    sync_offsets: int = 15
    data_format: str = "jpg"
    threads: int | None = None
    fps_frames: int = 128
    fps_runs: int = 3

    def __post_init__(self) -> None:
        for name, least in (("samples", 1), ("batch_size", 1), ("fps_frames", 1),
                            ("fps_runs", 0), ("sync_offsets", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise EvalError(f"{name} must be an int >= {least}, got {value!r}")
        if self.threads is not None and self.threads < 1:
            raise EvalError(f"threads must be >= 1, got {self.threads}")
        if self.data_format not in FORMATS:
            raise EvalError(f"data format must be one of {', '.join(FORMATS)}, got "
                            f"{self.data_format!r}")


@dataclass
class EvalTable:
    """Rows (one dict per model, keys of :data:`COLUMNS`) and how they were measured."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        """The table in Markdown, columns that no row fills left out, then a line of notes."""
        has_teacher = any(r["psnr_lower_teacher"] is not None for r in self.rows)
        has_sync = any(r["lse_d"] is not None for r in self.rows)
        columns = [c for c in COLUMNS
                   if (has_teacher or c[0] not in _TEACHER_COLUMNS)
                   and (has_sync or c[0] not in _SYNC_COLUMNS)]
        lines = ["| " + " | ".join(head for _, head, _ in columns) + " |",
                 "|" + "|".join("---" if fmt == "s" else "---:" for _, _, fmt in columns) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row[key], fmt) for key, _, fmt in columns)
                         + " |")
        return "\n".join(lines) + "\n\n" + self.meta.get("notes", "") + "\n"

    def to_json(self) -> str:
        """Rows and settings as JSON; an infinite PSNR is written as the string ``"inf"``."""
        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)
            return value

        rows = [{k: clean(v) for k, v in row.items()} for row in self.rows]
        return json.dumps({"meta": self.meta, "rows": rows}, indent=2) + "\n"


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, fmt)


def open_split(root: str | Path, settings: EvalSettings, sync: bool) -> WindowDataset:
    """The evaluation windows of ``root``'s split, with ``sync_mels`` when ``sync`` is set.

    Raises:
        EvalError: The root is not a folder or has no filelist for the split.
    """
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"data root {root} is not a folder; give a preprocessed folder "
                        f"(python -m data.preprocess)")
    if not (root / f"{settings.split}.txt").is_file():
        found = sorted(p.stem for p in root.glob("*.txt") if p.stem in ("train", "val", "test"))
        hint = f"pass --split {' or '.join(found)}" if found else "preprocess your videos into it"
        raise EvalError(f"data root {root} has no {settings.split!r} split "
                        f"({settings.split}.txt is missing); {hint}")
    return WindowDataset(root, settings.split, settings.samples, settings.mel_offset_frames,
                         deterministic=True, seed=settings.seed,
                         data_format=settings.data_format,
                         sync_offsets=settings.sync_offsets if sync else 0)


# --- measuring ----------------------------------------------------------------------------------


class _Fidelity:
    """Running sums for pooled PSNR (lower half and full frame) and mean lower-half SSIM."""

    def __init__(self) -> None:
        self.sse_lower = self.sse_full = 0.0
        self.n_lower = self.n_full = 0
        self.ssim_sum = 0.0
        self.frames = 0

    def update(self, out: Tensor, ref: Tensor) -> None:
        """Add a batch of (N, 3, H, W) frames compared with their references."""
        error = (out.double() - ref.double()).square()
        self.sse_full += float(error.sum())
        self.n_full += error.numel()
        self.sse_lower += float(lower_half(error).sum())
        self.n_lower += lower_half(error).numel()
        self.ssim_sum += float(ssim_index(lower_half(out), lower_half(ref))) * out.shape[0]
        self.frames += out.shape[0]

    @staticmethod
    def _psnr(sse: float, n: int) -> float:
        return math.inf if sse == 0 else 10.0 * math.log10(n / sse)

    def results(self, suffix: str) -> dict[str, float]:
        return {f"psnr_lower_{suffix}": self._psnr(self.sse_lower, self.n_lower),
                f"ssim_lower_{suffix}": self.ssim_sum / self.frames,
                f"psnr_full_{suffix}": self._psnr(self.sse_full, self.n_full)}


def _windows(frames: Tensor, batch: int) -> Tensor:
    """(B * 5, 3, H, W) frames in window-major order -> (B, 3, 5, H, W) windows."""
    return frames.unflatten(0, (batch, WINDOW)).transpose(1, 2)


def _frames(windows: Tensor) -> Tensor:
    """(B, C, 5, H, W) windows -> (B * 5, C, H, W) frames, window-major."""
    return windows.transpose(1, 2).flatten(0, 1)


def _frames_per_second(run: Runner, mel: Tensor, face: Tensor, runs: int) -> float | None:
    if runs < 1:
        return None
    run(mel, face)  # warm-up: first-call allocations, lazy initialisation, caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(mel, face)
        times.append(time.perf_counter() - start)
    return mel.shape[0] / statistics.median(times)


@torch.no_grad()
def evaluate(
    candidates: Sequence[Candidate],
    dataset: WindowDataset,
    settings: EvalSettings,
    syncnet: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Run every candidate on the same windows and measure it; returns one row per candidate.

    With ``syncnet`` the dataset must give ``sync_mels`` (``sync_offsets`` > 0), and a last row
    scores the ground-truth frames.
    """
    teacher = next((c for c in candidates if c.is_teacher), None)
    to_teacher = {c.name: _Fidelity() for c in candidates} if teacher else {}
    to_truth = {c.name: _Fidelity() for c in candidates}
    distances: dict[str, list[Tensor]] = {c.name: [] for c in candidates}
    distances[GROUND_TRUTH] = []
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=0)
    speed_input = None
    for index, batch in enumerate(loader):
        n = batch["face"].shape[0]
        mel = batch["mel"].flatten(0, 1).float()
        face = _frames(batch["face"]).float()
        truth = _frames(batch["target"]).float()
        if speed_input is None:
            speed_input = (mel, face)
        outputs = {c.name: _run_checked(c, mel, face) for c in candidates}
        for c in candidates:
            out = outputs[c.name]
            to_truth[c.name].update(out, truth)
            if teacher is not None:
                to_teacher[c.name].update(out, outputs[teacher.name])
            if syncnet is not None:
                distances[c.name].append(sync_distances(syncnet, _windows(out, n),
                                                        batch["sync_mels"]).cpu())
        if syncnet is not None:
            distances[GROUND_TRUTH].append(
                sync_distances(syncnet, batch["target"].float(), batch["sync_mels"]).cpu())
        log.info("evaluated batch %d of %d", index + 1, len(loader))

    rows = []
    fps_mel, fps_face = _speed_batch(speed_input, settings.fps_frames)
    for c in candidates:
        macs = c.macs or {}
        row = {
            "model": c.name,
            "type": c.kind,
            "parameters": c.parameters,
            "gmacs_convt_output": _giga(macs.get("macs_convt_output")),
            "gmacs_convt_input": _giga(macs.get("macs_convt_input")),
            **dict.fromkeys(_TEACHER_COLUMNS),
            **to_truth[c.name].results("gt"),
            **_sync_columns(distances[c.name]),
            "fps": None,
        }
        if teacher is not None:
            row.update(to_teacher[c.name].results("teacher"))
        if settings.fps_runs:
            log.info("timing %s on %d frames", c.name, fps_mel.shape[0])
        row["fps"] = _frames_per_second(c.run, fps_mel, fps_face, settings.fps_runs)
        rows.append({key: row[key] for key, _, _ in COLUMNS})
    if syncnet is not None:
        truth_row = dict.fromkeys(key for key, _, _ in COLUMNS)
        truth_row.update(model=GROUND_TRUTH, type="real frames",
                         **_sync_columns(distances[GROUND_TRUTH]))
        rows.append(truth_row)
    return rows


def _run_checked(candidate: Candidate, mel: Tensor, face: Tensor) -> Tensor:
    out = candidate.run(mel, face)
    if tuple(out.shape) != (mel.shape[0], 3, IMG_SIZE, IMG_SIZE):
        raise EvalError(f"{candidate.name} returned {tuple(out.shape)} for {mel.shape[0]} "
                        f"frames; a generator gives (N, 3, {IMG_SIZE}, {IMG_SIZE})")
    return out.float().cpu()


def _speed_batch(first: tuple[Tensor, Tensor], frames: int) -> tuple[Tensor, Tensor]:
    """``frames`` real inputs: the first batch's, repeated as often as needed."""
    mel, face = first
    index = torch.arange(frames) % mel.shape[0]
    return mel[index].contiguous(), face[index].contiguous()


def _sync_columns(distances: list[Tensor]) -> dict[str, Any]:
    if not distances:
        return dict.fromkeys(_SYNC_COLUMNS)
    d = torch.cat(distances)
    lse_d, lse_c = lse_scores(d)
    return {"lse_d": lse_d, "lse_c": lse_c, "sync_offset": best_offset(d)}


def _giga(value: int | None) -> float | None:
    return None if value is None else value / 1e9


def evaluate_files(
    data_root: str | Path,
    settings: EvalSettings,
    teacher: str | Path | None = None,
    students: Sequence[str | Path] = (),
    programs: Sequence[str | Path] = (),
    syncnet: str | Path | None = None,
) -> EvalTable:
    """Load the models and the split named, evaluate them, and return the table.

    Raises:
        EvalError: Any bad value (one line, naming it and the fix); checkpoint and data errors
            are turned into it too.
    """
    if syncnet is not None and settings.sync_offsets < 1:
        raise EvalError("--sync-offsets must be at least 1 with --syncnet: LSE-C compares "
                        "offsets")
    threads = settings.threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Cheap checks first, so that a typo fails before any large file is read.
        entries = model_entries(teacher, students, programs)
        if syncnet is not None:
            check_file(Path(syncnet), "--syncnet")
        try:
            dataset = open_split(data_root, settings, sync=syncnet is not None)
            expert = load_syncnet(syncnet) if syncnet is not None else None
        except (DataError, CheckpointError) as err:
            raise EvalError(str(err)) from None
        rows = evaluate(load_candidates(entries, threads), dataset, settings, expert)
    finally:
        torch.set_num_threads(previous)
    meta = {
        "data_root": str(data_root), "split": settings.split, "windows": settings.samples,
        "frames": settings.samples * WINDOW, "seed": settings.seed,
        "mel_offset_frames": settings.mel_offset_frames, "threads": threads,
        "fps_frames": settings.fps_frames, "fps_runs": settings.fps_runs,
        "syncnet": str(syncnet) if syncnet is not None else None,
        "sync_offsets": settings.sync_offsets if syncnet is not None else None,
    }
    meta["notes"] = _notes(meta)
    return EvalTable(rows, meta)


def _notes(meta: dict[str, Any]) -> str:
    notes = (f"{meta['windows']} windows ({meta['frames']} frames) of {meta['data_root']} split "
             f"{meta['split']!r}, seed {meta['seed']}. PSNR pooled over frames, lower = rows "
             f"{LOWER}-{IMG_SIZE - 1}; SSIM of the lower half (torchmetrics, mean over frames). "
             f"MACs: convolutions per frame. Program parameters: conv weights and biases with "
             f"BatchNorm folded.")
    if meta["fps_runs"]:
        threads = f"{meta['threads']} thread{'s' if meta['threads'] != 1 else ''}"
        notes += (f" Speed: batch of {meta['fps_frames']} frames, {threads}, median of "
                  f"{meta['fps_runs']} timed runs after a warm-up.")
    if meta["syncnet"]:
        notes += (f" LSE-D / LSE-C: Wav2Lip expert {meta['syncnet']}, offsets "
                  f"+-{meta['sync_offsets']} frames (unit-norm embeddings: comparable between "
                  f"these rows, not with syncnet_python's published values).")
    return notes
