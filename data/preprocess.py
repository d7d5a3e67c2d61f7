"""Turn talking-face videos into the LRS2-style layout that Wav2Lip trains on.

For each clip ``ROOT/<clip>/`` holds ``<i>.jpg`` face crops, where ``i`` indexes a 25 fps timeline
(frames without a face are left out) and ``audio.wav`` (16 kHz mono PCM). ``ROOT/train.txt`` and
``ROOT/val.txt`` list clip paths relative to ROOT. The layout follows the preprocessing described
for Wav2Lip (Prajwal et al., ACM MM 2020); the code is written anew, uses PyAV for decoding and an
OpenCV Haar cascade as the default face detector, so it needs no download and no system FFmpeg.

Usage: ``python -m data.preprocess --input DIR_OR_FILES... --output ROOT``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import wave
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import av
import cv2
import numpy as np

from data.audio import FPS, SAMPLE_RATE, AudioError, load_audio, save_wav

log = logging.getLogger(__name__)

VIDEO_EXTS = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv"})

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive


class PreprocessError(ValueError):
    """Bad arguments to ``preprocess``; the message is one line and names the fix."""


class ClipRejected(Exception):
    """A clip that cannot be used; the message is the one-line reason shown in the summary."""


class FaceDetector(Protocol):
    """Anything that finds the main face in a BGR frame (Haar now, S3FD later)."""

    def detect(self, frame_bgr: np.ndarray) -> Box | None:
        """Return the box of the main face, or None when there is none."""
        ...


class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade; ships with opencv-python, so nothing to download.

    Args:
        min_face: Faces whose shorter side is below this many pixels (full resolution) are ignored.
        max_side: Frames with a longer side are downscaled to it before detection, for speed.
    """

    def __init__(self, min_face: int = 40, max_side: int = 640) -> None:
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise RuntimeError(f"cannot load {path}; install opencv-python-headless 4.x")
        self.min_face = min_face
        self.max_side = max_side

    def detect(self, frame_bgr: np.ndarray) -> Box | None:
        """Return the largest face at least ``min_face`` pixels wide, or None."""
        h, w = frame_bgr.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        gray = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        min_px = max(1, int(self.min_face * scale))
        faces = self._cascade.detectMultiScale(
            cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5, minSize=(min_px, min_px)
        )
        if len(faces) == 0:
            return None
        x, y, bw, bh = max(faces, key=lambda f: int(f[2]) * int(f[3]))
        x1, y1 = max(0, round(x / scale)), max(0, round(y / scale))
        x2, y2 = min(w, round((x + bw) / scale)), min(h, round((y + bh) / scale))
        if min(x2 - x1, y2 - y1) < self.min_face:
            return None
        return x1, y1, x2, y2


class _Timeline:
    """Hands out 25 fps timeline indices to source frames by timestamp.

    A source frame starting at ``t`` owns every index ``i`` with ``t <= i / fps`` before the next
    frame's start, i.e. each index shows the latest frame already on screen at its time.
    """

    def __init__(self, fps: int = FPS, limit: int | None = None) -> None:
        self.fps = fps
        self.limit = limit
        self.next_index = 0

    def claim(self, stop: int) -> range:
        if self.limit is not None:
            stop = min(stop, self.limit)
        owned = range(self.next_index, max(self.next_index, stop))
        self.next_index = owned.stop
        return owned

    def until(self, next_start: Fraction) -> range:
        """Indices of the pending frame, given the next frame's start time."""
        return self.claim(math.ceil(next_start * self.fps))

    def finish(self, end: Fraction) -> range:
        """Indices of the last frame; the timeline has ``floor(end * fps)`` indices."""
        return self.claim(math.floor(end * self.fps))

    @property
    def full(self) -> bool:
        return self.limit is not None and self.next_index >= self.limit


def _frac(t: float | Fraction) -> Fraction:
    # Float timestamps such as 6/30 are slightly off; snap them so i/25 comparisons are exact.
    return t if isinstance(t, Fraction) else Fraction(t).limit_denominator(1_000_000)


def timeline_sources(
    times: Sequence[float | Fraction], end: float | Fraction | None = None, fps: int = FPS
) -> list[int]:
    """Map each index of a ``fps`` timeline to the source frame shown at that time.

    Times are taken relative to the first frame. Index ``i`` (time ``i / fps``) gets the latest
    frame whose time is ``<= i / fps``; there are ``floor(duration * fps)`` indices, where
    ``duration`` is ``end`` minus the first time.

    Args:
        times: Presentation times of the decoded frames in seconds, non-decreasing.
        end: End of the last frame; defaults to one frame interval after the last time.
        fps: Rate of the output timeline.

    Returns:
        For each timeline index, the position in ``times`` of its source frame.
    """
    if not times:
        return []
    rel = [_frac(t) - _frac(times[0]) for t in times]
    if end is None:
        step = rel[-1] - rel[-2] if len(rel) > 1 else Fraction(1, fps)
        end_rel = rel[-1] + step
    else:
        end_rel = _frac(end) - _frac(times[0])
    timeline = _Timeline(fps)
    sources: list[int] = []
    for k in range(len(rel)):
        owned = timeline.until(rel[k + 1]) if k + 1 < len(rel) else timeline.finish(end_rel)
        sources.extend([k] * len(owned))
    return sources


@dataclasses.dataclass
class ClipRecord:
    """Outcome for one input clip, as shown in the summary table and ``summary.json``."""

    name: str
    source: str
    status: str = "ok"  # ok | skipped | rejected
    reason: str = ""
    frames_kept: int = 0
    frames_dropped: int = 0
    source_fps: float | None = None
    audio_seconds: float | None = None
    video_seconds: float | None = None
    split: str = ""  # train | val | train+val | ""

    @property
    def usable(self) -> bool:
        """Whether the clip folder exists and belongs in the filelists."""
        return self.status in ("ok", "skipped")


def find_clips(inputs: Sequence[str | Path], output: str | Path) -> list[tuple[str, Path]]:
    """List ``(clip name, source file)`` pairs from files and folders.

    Files keep their stem as the name (whatever their extension). Folders are searched
    recursively for video files; a clip's name is its path under the folder without extension,
    e.g. ``main/spk1/00001.mp4`` under ``main`` gives ``spk1/00001``.

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


def _timed_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> Iterator[tuple[av.VideoFrame, Fraction]]:
    """Decoded frames with their start time relative to the first frame, in seconds."""
    rate = stream.average_rate or stream.guessed_rate
    step = Fraction(1, FPS) if not rate else 1 / Fraction(rate)
    start = t = None
    for frame in container.decode(stream):
        raw = None if frame.pts is None else Fraction(frame.pts) * stream.time_base
        start = raw if start is None else start
        if t is None:
            t = Fraction(0)
        elif raw is None or start is None or raw - start < t:
            t = t + step  # missing or backward stamp: assume the nominal rate
        else:
            t = raw - start
        yield frame, t


def _extract_faces(
    src: Path, dest: Path, detector: FaceDetector, rec: ClipRecord, max_seconds: float | None
) -> None:
    """Write the 25 fps timeline crops of ``src`` into ``dest``, counting frames in ``rec``."""
    timeline = _Timeline(FPS, None if max_seconds is None else math.floor(max_seconds * FPS))

    def emit(frame: av.VideoFrame, owned: range) -> None:
        if not owned:
            return  # on screen for less than one timeline step: skip the pixel conversion
        image = frame.to_ndarray(format="bgr24")
        box = detector.detect(image)
        if box is not None:  # clamp, so a sloppy backend cannot produce an empty crop
            h, w = image.shape[:2]
            x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
            x2, y2 = min(w, int(box[2])), min(h, int(box[3]))
        if box is None or x2 <= x1 or y2 <= y1:
            rec.frames_dropped += len(owned)
            return
        ok, jpg = cv2.imencode(".jpg", image[y1:y2, x1:x2])
        if not ok:
            raise ClipRejected(f"cannot encode a {x2 - x1}x{y2 - y1} crop as JPEG")
        for i in owned:
            (dest / f"{i}.jpg").write_bytes(jpg.tobytes())
        rec.frames_kept += len(owned)

    try:
        with av.open(str(src)) as container:
            if not container.streams.video:
                raise ClipRejected("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            rec.source_fps = round(float(rate), 3) if rate else None
            pending, t = None, Fraction(0)
            for frame, t_next in _timed_frames(container, stream):
                if pending is not None:
                    emit(pending, timeline.until(t_next))
                pending, t = frame, t_next
                if timeline.full:
                    break
            if pending is None:
                raise ClipRejected("no video frames decoded")
            if not timeline.full:
                dur = (pending.duration or 0) * stream.time_base
                end = t + (dur or (1 / Fraction(rate) if rate else Fraction(1, FPS)))
                rec.video_seconds = round(float(end), 3)
                emit(pending, timeline.finish(end))
    except av.FFmpegError as exc:
        raise ClipRejected(f"cannot decode video: {str(exc).splitlines()[0]}") from exc
    if rec.frames_kept == 0:
        raise ClipRejected(f"no face found in any of {rec.frames_dropped} timeline frames")


def _audio_seconds(path: Path) -> float | None:
    try:
        with wave.open(str(path)) as wav:
            return wav.getnframes() / wav.getframerate()
    except (OSError, wave.Error):
        return None


def process_clip(
    name: str,
    src: Path,
    output: Path,
    detector: FaceDetector,
    max_seconds: float | None = None,
) -> ClipRecord:
    """Preprocess one clip into ``output / name``, atomically; never raises for a bad clip.

    Returns:
        The record; status ``skipped`` when the clip folder is already complete.
    """
    dest = output / name
    if (dest / "audio.wav").is_file():
        kept = sum(1 for p in dest.glob("*.jpg"))
        return ClipRecord(
            name, str(src), "skipped", "already done", kept, audio_seconds=_audio_seconds(dest)
        )
    rec = ClipRecord(name, str(src))
    tmp = output / f".tmp-{name.replace('/', '--')}"
    try:
        if any(c.isspace() for c in name):
            raise ClipRejected("clip path has whitespace, which filelists cannot hold; rename it")
        if dest.exists():
            raise ClipRejected(f"{dest} exists but is not a finished clip; remove it")
        wav = load_audio(src)
        if max_seconds is not None:
            wav = wav[: int(max_seconds * SAMPLE_RATE)]
        rec.audio_seconds = round(len(wav) / SAMPLE_RATE, 3)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted run
        tmp.mkdir(parents=True)
        _extract_faces(src, tmp, detector, rec, max_seconds)
        save_wav(tmp / "audio.wav", wav)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    except (ClipRejected, AudioError) as exc:
        rec.status, rec.reason = "rejected", str(exc).removeprefix(f"{src}: ")
        log.warning("rejected %s: %s", src, rec.reason)
    except Exception as exc:  # one broken clip must not stop a long batch
        first = str(exc).splitlines()[0] if str(exc) else ""
        rec = ClipRecord(name, str(src), "rejected", f"{type(exc).__name__}: {first}")
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
    names: Iterable[str], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split clip names into train and val, deterministically for a seed.

    With two or more clips each side gets at least one; a single clip goes to both.
    """
    names = sorted(set(names))
    if len(names) < 2:
        if names:
            log.warning("only one clip (%s): it is used for both train and val", names[0])
        return names, list(names)
    shuffled = list(names)
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(names) - 1, max(1, round(len(names) * val_fraction)))
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    os.replace(tmp, path)


def _previous_records(output: Path) -> dict[str, dict]:
    try:
        return {r["name"]: r for r in json.loads((output / "summary.json").read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def preprocess(
    inputs: Sequence[str | Path],
    output: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    min_face: int = 40,
    max_seconds: float | None = None,
    detector: FaceDetector | None = None,
) -> list[ClipRecord]:
    """Preprocess videos into ``output`` and write ``train.txt``, ``val.txt``, ``summary.json``.

    Finished clip folders are skipped, so a re-run only adds what is missing. Filelists are
    written only when at least one clip is usable; check the records' ``status``.

    Args:
        inputs: Video files and/or folders searched recursively for videos.
        output: Root folder of the layout.
        val_fraction: Share of clips for validation (split by clip).
        seed: Seed of the split.
        min_face: Smallest face side in pixels for the default detector.
        max_seconds: Optional cap on the processed length of each clip (video and audio).
        detector: Face detector; defaults to ``HaarFaceDetector(min_face)``.

    Returns:
        One record per input clip, in input order.

    Raises:
        PreprocessError: Bad arguments, a missing input, or no video among the inputs.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise PreprocessError(f"val_fraction must be in [0, 1), got {val_fraction}")
    output = Path(output)
    clips = find_clips(inputs, output)
    output.mkdir(parents=True, exist_ok=True)
    detector = detector or HaarFaceDetector(min_face=min_face)
    previous = _previous_records(output)

    records: list[ClipRecord] = []
    seen: set[str] = set()
    for name, src in clips:
        if name in seen:
            records.append(ClipRecord(name, str(src), "rejected", "duplicate clip name"))
            continue
        seen.add(name)
        rec = process_clip(name, src, output, detector, max_seconds)
        if rec.status == "skipped" and name in previous:
            old = previous[name]
            rec.frames_dropped = old.get("frames_dropped", 0)
            rec.source_fps = old.get("source_fps")
            rec.video_seconds = old.get("video_seconds")
        records.append(rec)

    usable = [r.name for r in records if r.usable]
    if usable:
        train, val = split_clips(usable, val_fraction, seed)
        for rec in records:
            if rec.usable:
                rec.split = "+".join(s for s, names in (("train", train), ("val", val))
                                     if rec.name in names)
        _write_lines(output / "train.txt", train)
        _write_lines(output / "val.txt", val)
    (output / "summary.json").write_text(
        json.dumps([dataclasses.asdict(r) for r in records], indent=1) + "\n"
    )
    return records


def format_summary(records: Sequence[ClipRecord]) -> str:
    """Render records as a fixed-width table."""
    width = max([4] + [len(r.name) for r in records])
    head = f"{'clip':<{width}}  {'kept':>5}  {'drop':>5}  {'fps':>6}  {'audio_s':>7}  status"
    rows = [head, "-" * len(head)]
    for r in records:
        fps = f"{r.source_fps:.2f}" if r.source_fps else "-"
        dur = f"{r.audio_seconds:.2f}" if r.audio_seconds is not None else "-"
        status = f"{r.status} ({r.reason})" if r.reason else r.status
        if r.split:
            status += f" [{r.split}]"
        rows.append(
            f"{r.name:<{width}}  {r.frames_kept:>5}  {r.frames_dropped:>5}  {fps:>6}  "
            f"{dur:>7}  {status}"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m data.preprocess", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--input", nargs="+", required=True, type=Path, help="videos or folders")
    parser.add_argument("--output", required=True, type=Path, help="root of the layout")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-face", type=int, default=40, help="smallest face side, pixels")
    parser.add_argument("--max-seconds", type=float, default=None, help="cap per clip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        records = preprocess(
            args.input, args.output, args.val_fraction, args.seed, args.min_face, args.max_seconds
        )
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(records))
    usable = sum(r.usable for r in records)
    if not usable:
        print(f"error: no clip could be used ({len(records)} rejected); see the reasons above",
              file=sys.stderr)
        return 1
    print(f"{usable}/{len(records)} clips ready in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
