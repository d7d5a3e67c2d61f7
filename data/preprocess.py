"""Turn talking-face videos into the LRS2-style layout that Wav2Lip trains on.

For each clip ``ROOT/<clip>/`` holds ``<i>.jpg`` face crops, where ``i`` indexes a 25 fps timeline
(frames without a usable face are left out), ``audio.wav`` (16 kHz mono PCM, sample 0 at the time
of timeline index 0), ``mel.npy`` (its cached mel) and ``record.json`` (what happened to the clip).
``ROOT/train.txt``, ``ROOT/val.txt`` and ``ROOT/test.txt`` list clip paths relative to ROOT, split
by clip. The layout follows the preprocessing described for Wav2Lip (Prajwal et al., ACM MM 2020);
the code is written anew, uses PyAV for decoding and an OpenCV Haar cascade as the default face
detector (S3FD with a user-given weight file as the other), so it needs no download and no system
FFmpeg. Clips are written atomically (a temporary folder renamed at the end), so a re-run skips
finished clips and redoes interrupted ones.

This module processes clips, splits them and writes the summary, and holds the CLI; face
detection and the face policy live in ``data.faces``, decoding onto the timeline in ``data.video``.

Usage: ``python -m data.preprocess --input DIR_OR_FILES... --output ROOT``
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import sys
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import torch
from tqdm import tqdm

from data.audio import (
    FPS,
    MIN_AUDIO_SECONDS,
    SAMPLE_RATE,
    AudioError,
    decode_audio,
    load_audio,
    melspectrogram,
    save_wav,
)
from data.errors import ClipRejected, PreprocessError, first_reason
from data.faces import (
    DROP_REASONS,
    MULTI_FACE_POLICIES,
    Box,
    FaceDetector,
    FacePolicy,
    HaarFaceDetector,
    as_boxes,
    choose_face,
    make_detector,
    pad_box,
    smoothed_box,
)
from data.video import Timeline, first_video_stream, probe_video, timed_frames

log = logging.getLogger(__name__)

# A sound track whose loudest sample is this quiet holds no speech (16-bit PCM's floor is -90).
SILENCE_PEAK_DB = -60
VIDEO_EXTS = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv"})

@dataclasses.dataclass
class ClipRecord:
    """Outcome for one input clip: the summary table row, ``summary.json`` and ``record.json``.

    Frame counts are in 25 fps timeline frames; ``dropped`` splits ``frames_dropped`` by reason.
    ``audio_offset`` is how much later the sound track starts than the first video frame (the
    audio is padded or trimmed by it, so that sample 0 is at timeline index 0).
    """

    name: str
    source: str
    status: str = "ok"  # ok | skipped | rejected
    reason: str = ""
    frames_kept: int = 0
    frames_dropped: int = 0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    several_faces_kept: int = 0  # frames where ``largest`` picked one of several faces
    source_fps: float | None = None
    source_frames: int = 0
    variable_rate: bool = False
    audio_seconds: float | None = None
    audio_offset: float = 0.0
    video_seconds: float | None = None
    split: str = ""  # train | val | test | train+val | ""
    # The face options and length limit the crops were made with (empty: not recorded).
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def usable(self) -> bool:
        """Whether the clip folder exists and belongs in the filelists."""
        return self.status in ("ok", "skipped")

    def drop(self, reason: str, count: int) -> None:
        """Count ``count`` timeline frames dropped for ``reason``."""
        self.frames_dropped += count
        self.dropped[reason] = self.dropped.get(reason, 0) + count


def find_clips(inputs: Sequence[str | Path], output: str | Path) -> list[tuple[str, Path]]:
    """List ``(clip name, source file)`` pairs from files and folders.

    Files keep their stem as the name (whatever their extension). Folders are searched
    recursively for video files; a clip's name is its path under the folder without extension,
    e.g. ``main/spk1/00001.mp4`` under ``main`` gives ``spk1/00001`` (LRS2's tree), and a flat
    folder gives the file stems.

    Raises:
        PreprocessError: An input does not exist, or none holds a video.
    """
    output = Path(output).resolve()
    clips: list[tuple[str, Path]] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise PreprocessError(f"input not found: {item}")
        if item.is_file():
            clips.append((item.stem, item))
            continue
        for path in sorted(item.rglob("*")):
            rel = path.relative_to(item)
            hidden = any(part.startswith(".") for part in rel.parts)
            if hidden or path.suffix.lower() not in VIDEO_EXTS or not path.is_file():
                continue
            if path.resolve().is_relative_to(output):
                continue
            clips.append((rel.with_suffix("").as_posix(), path))
    if not clips:
        exts = " ".join(sorted(VIDEO_EXTS))
        raise PreprocessError(f"no video files ({exts}) in {', '.join(map(str, inputs))}")
    return clips


class _FaceWriter:
    """Detects, smooths and writes face crops for a stream of source frames.

    Smoothing is centred, so each frame waits for the boxes of the next ``smooth // 2`` frames;
    only those few full-resolution frames are held in memory.
    """

    def __init__(
        self, dest: Path | None, detector: FaceDetector, policy: FacePolicy, rec: ClipRecord
    ) -> None:
        self.dest, self.detector, self.policy, self.rec = dest, detector, policy, rec
        self.half = policy.smooth // 2
        self.boxes: list[Box | None] = []
        self.pending: collections.deque[tuple[int, np.ndarray, range]] = collections.deque()

    def add(self, frame: av.VideoFrame, owned: range) -> None:
        if not owned:
            return  # on screen for less than one timeline step: skip the pixel conversion
        image = frame.to_ndarray(format="bgr24")
        box, reason = choose_face(as_boxes(self.detector.detect(image)), self.policy)
        if box is None:
            self.rec.drop(reason, len(owned))
        elif reason:
            self.rec.several_faces_kept += len(owned)
        self.boxes.append(box)
        if box is not None:
            self.pending.append((len(self.boxes) - 1, image, owned))
        while self.pending and self.pending[0][0] + self.half < len(self.boxes):
            self._emit(*self.pending.popleft())

    def finish(self) -> None:
        while self.pending:
            self._emit(*self.pending.popleft())

    def _emit(self, pos: int, image: np.ndarray, owned: range) -> None:
        h, w = image.shape[:2]
        smooth = smoothed_box(self.boxes, pos, self.half)
        x1, y1, x2, y2 = pad_box(smooth, self.policy.pads, w, h)
        if x2 <= x1 or y2 <= y1:  # a sloppy backend's box off the frame
            self.rec.drop("no_face", len(owned))
            return
        if self.dest is not None:
            ok, jpg = cv2.imencode(".jpg", image[y1:y2, x1:x2])
            if not ok:
                raise ClipRejected(f"cannot encode a {x2 - x1}x{y2 - y1} crop as JPEG")
            for i in owned:
                (self.dest / f"{i}.jpg").write_bytes(jpg.tobytes())
        self.rec.frames_kept += len(owned)


def _extract_faces(
    src: Path,
    dest: Path | None,
    detector: FaceDetector,
    policy: FacePolicy,
    rec: ClipRecord,
    max_seconds: float | None,
    max_frames: int | None = None,
) -> Fraction:
    """Write the 25 fps timeline crops of ``src`` into ``dest``, counting frames in ``rec``.

    Returns:
        The presentation time of the first video frame, in seconds.
    """
    limit = None if max_seconds is None else math.floor(max_seconds * FPS)
    timeline = Timeline(FPS, limit)
    writer = _FaceWriter(dest, detector, policy, rec)
    gaps: list[Fraction] = []
    first = Fraction(0)
    try:
        with av.open(str(src)) as container:
            stream = first_video_stream(container)
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            rec.source_fps = round(float(rate), 3) if rate else None
            pending, t = None, Fraction(0)
            for frame, t_next, first in timed_frames(container, stream):
                rec.source_frames += 1
                if pending is not None:
                    gaps.append(t_next - t)
                    writer.add(pending, timeline.until(t_next))
                pending, t = frame, t_next
                if timeline.full or (max_frames and rec.source_frames > max_frames):
                    pending = None if max_frames else pending
                    break
            if pending is None and rec.source_frames == 0:
                raise ClipRejected("no video frames decoded; the file may be truncated")
            if pending is not None and not timeline.full:
                dur = (pending.duration or 0) * stream.time_base
                end = t + (dur or (1 / Fraction(rate) if rate else Fraction(1, FPS)))
                rec.video_seconds = round(float(end), 3)
                writer.add(pending, timeline.finish(end))
            writer.finish()
    except av.FFmpegError as exc:
        raise ClipRejected(f"cannot decode video: {first_reason(exc)}") from exc
    rec.variable_rate = bool(gaps) and max(gaps) - min(gaps) > Fraction(1, 1000)
    if rec.frames_kept == 0 and not max_frames:
        why = ", ".join(f"{k} {v}" for k, v in rec.dropped.items()) or "none decoded"
        raise ClipRejected(f"no usable face in any of {rec.frames_dropped} timeline frames "
                           f"({why}); check the video shows one face")
    return first


def _finished_record(name: str, src: Path, dest: Path) -> ClipRecord:
    """The record of a clip finished by an earlier run (or an existing LRS2 folder)."""
    try:
        data = json.loads((dest / "record.json").read_text())
        fields = {f.name for f in dataclasses.fields(ClipRecord)}
        rec = ClipRecord(**{k: v for k, v in data.items() if k in fields})
    except (OSError, ValueError, TypeError):
        rec = ClipRecord(name, str(src), frames_kept=sum(1 for _ in dest.glob("*.jpg")))
    rec.name, rec.status, rec.reason, rec.split = name, "skipped", "already done", ""
    return rec


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def process_clip(
    name: str,
    src: Path,
    output: Path,
    detector: FaceDetector,
    max_seconds: float | None = None,
    policy: FacePolicy | None = None,
) -> ClipRecord:
    """Preprocess one clip into ``output / name``, atomically; never raises for a bad clip.

    Returns:
        The record; status ``skipped`` when the clip folder is already complete, ``rejected``
        (with a one-line reason and no folder written) when the clip cannot be used.
    """
    policy = policy or FacePolicy()
    settings = {**dataclasses.asdict(policy), "max_seconds": max_seconds}
    settings["pads"] = list(settings["pads"])
    dest = output / name
    if (dest / "audio.wav").is_file():
        done = _finished_record(name, src, dest)
        if done.settings and done.settings != settings:
            changed = sorted(k for k in settings if done.settings.get(k) != settings[k])
            done.status = "rejected"
            done.reason = (f"already preprocessed with other {', '.join(changed)} "
                           f"({', '.join(f'{k}={done.settings.get(k)}' for k in changed)}); "
                           f"remove {dest} to redo it, or use another --output")
            log.warning("rejected %s: %s", src, done.reason)
        return done
    rec = ClipRecord(name, str(src), settings=settings)
    tmp = output / f".tmp-{name.replace('/', '--')}"
    try:
        if any(c.isspace() for c in name):
            raise ClipRejected("clip path has whitespace, which filelists cannot hold; rename it")
        if dest.exists():
            raise ClipRejected(f"{dest} exists but is not a finished clip; remove it")
        probe_video(src)
        try:
            wav, audio_start = decode_audio(src)
        except AudioError as exc:
            reason = str(exc).removeprefix(f"{src}: ")
            if "no audio stream" in reason:
                probe = ClipRecord(name, str(src))
                _extract_faces(src, None, detector, policy, probe, None, max_frames=1)
                if not probe.frames_kept:
                    reason += "; and no face in its first frame"
            raise ClipRejected(reason) from exc
        peak = float(wav.abs().max())
        peak_db = 20 * math.log10(peak) if peak > 0 else -math.inf
        if peak_db < SILENCE_PEAK_DB:
            raise ClipRejected(f"audio is silent (peak {peak_db:.0f} dBFS, under "
                               f"{SILENCE_PEAK_DB} dBFS), so there is no speech to sync lips "
                               "to; check the clip's sound track")
        if len(wav) < MIN_AUDIO_SECONDS * SAMPLE_RATE:
            raise ClipRejected(f"audio lasts {len(wav) / SAMPLE_RATE:.3f} s, shorter than one "
                               f"{MIN_AUDIO_SECONDS:.1f} s mel window; give a longer clip")
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted run
        tmp.mkdir(parents=True)
        video_start = _extract_faces(src, tmp, detector, policy, rec, max_seconds)
        # Put audio sample 0 at the first video frame: pad when the sound starts later.
        shift = round((audio_start - float(video_start)) * SAMPLE_RATE)
        rec.audio_offset = round(shift / SAMPLE_RATE, 4)
        wav = torch.cat([torch.zeros(shift), wav]) if shift > 0 else wav[-shift:]
        if max_seconds is not None:
            wav = wav[: int(max_seconds * SAMPLE_RATE)]
        if len(wav) < MIN_AUDIO_SECONDS * SAMPLE_RATE:
            raise ClipRejected(f"audio overlapping the video lasts {len(wav) / SAMPLE_RATE:.3f}"
                               f" s, under {MIN_AUDIO_SECONDS:.1f} s; check the clip's tracks")
        rec.audio_seconds = round(len(wav) / SAMPLE_RATE, 3)
        save_wav(tmp / "audio.wav", wav)
        # Mel of the stored 16-bit file, so the cache equals what the dataset would compute.
        np.save(tmp / "mel.npy", melspectrogram(load_audio(tmp / "audio.wav")).numpy())
        _write_atomic(tmp / "record.json", json.dumps(dataclasses.asdict(rec), indent=1) + "\n")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    except ClipRejected as exc:
        # Keep the counts that explain the rejection; nothing was written, so nothing is kept.
        rec.status, rec.reason, rec.frames_kept = "rejected", str(exc), 0
        log.warning("rejected %s: %s", src, rec.reason)
    except Exception as exc:  # one broken clip must not stop a long batch
        rec = ClipRecord(name, str(src), "rejected", f"{type(exc).__name__}: {first_reason(exc)}")
        log.warning("rejected %s: %s", src, rec.reason)
        log.debug("traceback for %s", src, exc_info=True)
    else:
        log.info("%s: kept %d, dropped %d frames", name, rec.frames_kept, rec.frames_dropped)
        if rec.video_seconds and abs(rec.video_seconds - rec.audio_seconds) > 0.5:
            log.warning(
                "%s: audio lasts %.2f s but video %.2f s; windows past the shorter one have no "
                "audio or no frames", name, rec.audio_seconds, rec.video_seconds
            )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return rec


def split_clips(
    names: Iterable[str], val_fraction: float = 0.1, seed: int = 0, test_fraction: float = 0.1
) -> dict[str, list[str]]:
    """Split clip names into train, val and test, deterministically for a seed.

    The order of ``names`` does not matter. With two or more clips train and val get at least
    one each; test gets at least one when ``test_fraction > 0`` and three or more clips leave
    room. A single clip goes to both train and val.
    """
    names = sorted(set(names))
    if len(names) < 2:
        if names:
            log.warning("only one clip (%s): it is used for both train and val", names[0])
        return {"train": names, "val": list(names), "test": []}
    shuffled = list(names)
    random.Random(seed).shuffle(shuffled)
    n = len(names)
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    n_test = min(n_test, n - 2)
    n_val = min(n - n_test - 1, max(1, round(n * val_fraction)))
    return {
        "train": sorted(shuffled[n_test + n_val:]),
        "val": sorted(shuffled[n_test:n_test + n_val]),
        "test": sorted(shuffled[:n_test]),
    }


_WORKER: dict[str, Any] = {}


def _init_worker(detector: FaceDetector, policy: FacePolicy, threads: int) -> None:
    _WORKER.update(detector=detector, policy=policy)
    torch.set_num_threads(threads)  # workers share the cores instead of oversubscribing them
    cv2.setNumThreads(threads)


def _work(name: str, src: Path, output: Path, max_seconds: float | None) -> ClipRecord:
    return process_clip(name, src, output, _WORKER["detector"], max_seconds, _WORKER["policy"])


def preprocess(
    inputs: Sequence[str | Path],
    output: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    min_face: int = 40,
    max_seconds: float | None = None,
    detector: FaceDetector | None = None,
    *,
    test_fraction: float = 0.1,
    policy: FacePolicy | None = None,
    workers: int = 1,
    progress: bool = False,
) -> list[ClipRecord]:
    """Preprocess videos into ``output``; write the filelists, ``summary.json`` and a table.

    Finished clip folders are skipped, so a re-run only adds what is missing and an interrupted
    run, re-run, ends with the same files as an uninterrupted one. Filelists are written only
    when at least one clip is usable; check the records' ``status``.

    Args:
        inputs: Video files and/or folders searched recursively for videos.
        output: Root folder of the layout.
        val_fraction: Share of clips for validation (split by clip).
        seed: Seed of the split.
        min_face: Smallest face side in pixels (when ``policy`` is not given).
        max_seconds: Optional cap on the processed length of each clip (video and audio).
        detector: Face detector; defaults to ``HaarFaceDetector``.
        test_fraction: Share of clips for ``test.txt``.
        policy: What to do with missing, tiny and multiple faces, smoothing and padding.
        workers: Clips processed in parallel processes (1: in this process).
        progress: Show a progress bar on stderr.

    Returns:
        One record per input clip, in input order.

    Raises:
        PreprocessError: Bad arguments, a missing input, or no video among the inputs.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0
            and val_fraction + test_fraction < 1.0):
        raise PreprocessError(f"val_fraction {val_fraction} and test_fraction {test_fraction} "
                              f"must each be in [0, 1) and sum to less than 1")
    if workers < 1:
        raise PreprocessError(f"workers must be 1 or more, got {workers}")
    policy = policy or FacePolicy(min_face=min_face)
    output = Path(output)
    clips = find_clips(inputs, output)
    output.mkdir(parents=True, exist_ok=True)
    detector = detector or HaarFaceDetector(min_size=max(1, policy.min_face // 2))

    records: dict[int, ClipRecord] = {}
    todo: list[tuple[int, str, Path]] = []
    seen: set[str] = set()
    for k, (name, src) in enumerate(clips):
        if name in seen:
            records[k] = ClipRecord(name, str(src), "rejected", "duplicate clip name")
        else:
            seen.add(name)
            todo.append((k, name, src))
    bar = tqdm(total=len(todo), unit="clip", desc="preprocess", disable=not progress)
    if workers == 1 or len(todo) < 2:
        for k, name, src in todo:
            records[k] = process_clip(name, src, output, detector, max_seconds, policy)
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        # Spawned, not forked: a fork of a process whose torch/OpenMP threads hold a lock
        # (e.g. inside pytest or a notebook) can leave the workers waiting forever.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            workers, context, initializer=_init_worker, initargs=(detector, policy, threads)
        ) as pool:
            futures = {pool.submit(_work, name, src, output, max_seconds): k
                       for k, name, src in todo}
            for future in concurrent.futures.as_completed(futures):
                records[futures[future]] = future.result()
                bar.update()
    bar.close()
    ordered = [records[k] for k in range(len(clips))]

    usable = [r.name for r in ordered if r.usable]
    if usable:
        splits = split_clips(usable, val_fraction, seed, test_fraction)
        for rec in ordered:
            if rec.usable:
                rec.split = "+".join(s for s, names in splits.items() if rec.name in names)
        for split, names in splits.items():
            if names:
                _write_atomic(output / f"{split}.txt", "".join(f"{n}\n" for n in names))
            elif split == "test":
                (output / "test.txt").unlink(missing_ok=True)  # stale from a larger run
    _write_atomic(output / "summary.json",
                  json.dumps([dataclasses.asdict(r) for r in ordered], indent=1) + "\n")
    _write_atomic(output / "summary.txt", format_summary(ordered) + "\n")
    return ordered


def format_summary(records: Sequence[ClipRecord]) -> str:
    """Render records as a fixed-width table.

    Columns: timeline frames kept and dropped (in all, then by reason), the source frame rate
    (``v`` marks a variable rate), the audio duration and the status with the split.
    """
    width = max([4] + [len(r.name) for r in records])
    head = (f"{'clip':<{width}}  {'kept':>5}  {'drop':>5}  {'noface':>6}  {'tiny':>5}  "
            f"{'multi':>5}  {'src_fps':>8}  {'audio_s':>7}  status")
    rows = [head, "-" * len(head)]
    for r in records:
        fps = f"{r.source_fps:.2f}{'v' if r.variable_rate else ''}" if r.source_fps else "-"
        dur = f"{r.audio_seconds:.2f}" if r.audio_seconds is not None else "-"
        status = f"{r.status} ({r.reason})" if r.reason else r.status
        if r.split:
            status += f" [{r.split}]"
        counts = [r.dropped.get(k, 0) for k in DROP_REASONS]
        rows.append(
            f"{r.name:<{width}}  {r.frames_kept:>5}  {r.frames_dropped:>5}  {counts[0]:>6}  "
            f"{counts[1]:>5}  {counts[2]:>5}  {fps:>8}  {dur:>7}  {status}"
        )
    ok = [r for r in records if r.usable]
    rows.append(f"{len(ok)}/{len(records)} clips usable, {sum(r.frames_kept for r in ok)} frames "
                f"kept, {sum(r.frames_dropped for r in ok)} dropped")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m data.preprocess", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--input", nargs="+", required=True, type=Path,
                        help="videos, a flat folder of videos, or LRS2's main/ tree")
    parser.add_argument("--output", required=True, type=Path, help="root of the layout")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    parser.add_argument("--workers", type=int, default=1, help="clips processed in parallel")
    parser.add_argument("--detector", choices=("haar", "s3fd"), default="haar")
    parser.add_argument("--s3fd-weights", type=Path, default=None, help="s3fd-619a316812.pth")
    parser.add_argument("--min-face", type=int, default=40, help="smallest face side, pixels")
    parser.add_argument("--multi-face", choices=MULTI_FACE_POLICIES, default="largest",
                        help="frames with several faces: keep the largest, skip, or reject clip")
    parser.add_argument("--smooth", type=int, default=5,
                        help="box smoothing window in frames (1: raw boxes)")
    parser.add_argument("--pads", type=int, nargs=4, default=[0, 0, 0, 0],
                        metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                        help="pixels added around each box (original inference: 0 10 0 0)")
    parser.add_argument("--max-seconds", type=float, default=None, help="cap per clip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        policy = FacePolicy(args.min_face, args.multi_face, args.smooth, tuple(args.pads))
        detector = make_detector(args.detector, args.s3fd_weights, args.min_face)
        records = preprocess(
            args.input, args.output, args.val_fraction, args.seed, args.min_face,
            args.max_seconds, detector, test_fraction=args.test_fraction, policy=policy,
            workers=args.workers, progress=True,
        )
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(records))
    if not any(r.usable for r in records):
        print(f"error: no clip could be used ({len(records)} rejected); see the reasons above",
              file=sys.stderr)
        return 1
    print(f"clips ready in {args.output} (filelists, summary.json, summary.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
