"""Video decoding onto the 25 fps timeline that the training layout indexes.

Source frames are placed by their presentation timestamps, not by their count, so variable-rate
and non-25 fps clips keep their audio-visual alignment: each timeline index ``i`` shows the latest
source frame already on screen at ``i / 25`` s. Decoding uses PyAV, so no system FFmpeg is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av

from data.audio import FPS
from data.errors import ClipRejected, first_reason


class Timeline:
    """Hands out 25 fps timeline indices to source frames by timestamp.

    A source frame starting at ``t`` owns every index ``i`` with ``t <= i / fps`` before the next
    frame's start, i.e. each index shows the latest frame already on screen at its time.
    """

    def __init__(self, fps: int = FPS, limit: int | None = None) -> None:
        self.fps = fps
        self.limit = limit
        self.next_index = 0

    def claim(self, stop: int) -> range:
        """Indices from the next unclaimed one up to ``stop`` (capped at ``limit``)."""
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
        """Whether every index up to ``limit`` has been handed out."""
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
    timeline = Timeline(fps)
    sources: list[int] = []
    for k in range(len(rel)):
        owned = timeline.until(rel[k + 1]) if k + 1 < len(rel) else timeline.finish(end_rel)
        sources.extend([k] * len(owned))
    return sources


def first_video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The container's first video stream.

    Raises:
        ClipRejected: The file has no video stream.
    """
    if not container.streams.video:
        raise ClipRejected("no video stream; give a video file")
    return container.streams.video[0]


def probe_video(src: Path) -> None:
    """Reject files FFmpeg cannot open, in one line.

    Raises:
        ClipRejected: The file cannot be opened or has no video stream.
    """
    try:
        with av.open(str(src)) as container:
            first_video_stream(container)
    except av.FFmpegError as exc:
        raise ClipRejected(f"unreadable file ({first_reason(exc)}); check it is a complete "
                           f"video") from exc


def timed_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> Iterator[tuple[av.VideoFrame, Fraction, Fraction]]:
    """Decoded frames with their start time relative to the first frame, and the first's time."""
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
        yield frame, t, start or Fraction(0)
