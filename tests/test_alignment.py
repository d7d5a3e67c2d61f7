"""Audio-to-frame alignment end to end: marked frames and clicks through preprocess and dataset.

Each generated clip shows a white marker on the source frames on screen at chosen instants
``i / 25`` s and has an audio click at exactly those instants. After the real preprocessing
(with a fixed-box detector) the marker must sit on timeline frame ``i`` and nowhere else, and in
every training sample whose target window holds a marked frame, that frame's mel window must peak
at the column the documented convention predicts (``frame_instant_column``).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from data import preprocess as pp
from data.dataset import WindowDataset, frame_instant_column, mel_start

SIZE = 128
BOX = (16, 16, 112, 112)  # a 96x96 crop: the dataset's resize is then the identity
MARK = (slice(4, 28), slice(4, 28))  # marker rows/cols inside the crop (upper half)
TICKS = 90000  # mp4 time base for libx264 (1/90000 s)


class FixedBox:
    """The whole test frame's centre is "the face"."""

    def detect(self, frame_bgr: np.ndarray) -> list[tuple[int, int, int, int]]:
        return [BOX]


def source_times(kind: str, seconds: float, seed: int = 0) -> list[Fraction]:
    """Presentation times of the source frames, exact multiples of 1/90000 s."""
    if kind == "vfr":
        rng = np.random.default_rng(seed)
        ms, times = 0, []
        while ms < seconds * 1000:
            times.append(Fraction(ms, 1000))
            ms += int(rng.integers(15, 56))  # 15-55 ms gaps: both sides of 40 ms
        return times
    rate = {"25": Fraction(25), "29.97": Fraction(30000, 1001), "30": Fraction(30)}[kind]
    return [k / rate for k in range(int(seconds * rate))]


def shown_at(times: list[Fraction], i: int) -> int:
    """Source frame on screen at timeline instant i/25: the latest that started by then."""
    return max(k for k, t in enumerate(times) if t <= Fraction(i, 25))


def choose_marks(times: list[Fraction], n_timeline: int) -> dict[int, int]:
    """Timeline index -> source frame to mark, 9 frames (360 ms) apart, each shown only once."""
    owners = [shown_at(times, i) for i in range(n_timeline)]
    marks: dict[int, int] = {}
    i = 8
    while i < n_timeline - 8:
        k = owners[i]
        if owners.count(k) == 1:
            marks[i] = k
            i += 9
        else:
            i += 1
    return marks


def write_clip(
    path: Path, kind: str, vcodec: str, acodec: str, sample_rate: int, seconds: float = 4.0
) -> dict[int, int]:
    """Write the clip; returns {timeline index: marked source frame}."""
    times = source_times(kind, seconds)
    marks = choose_marks(times, int(seconds * 25))
    marked = set(marks.values())
    with av.open(str(path), "w") as out:
        video = out.add_stream(vcodec, rate=25 if kind == "vfr" else Fraction(times[1]) ** -1)
        video.width = video.height = SIZE
        video.pix_fmt = "yuv420p"
        if vcodec == "libx264":
            video.codec_context.time_base = Fraction(1, TICKS)
            video.options = {"crf": "12"}
        audio = out.add_stream(acodec, rate=sample_rate)
        audio.layout = "mono"
        for k, t in enumerate(times):
            image = np.zeros((SIZE, SIZE, 3), np.uint8)
            if k in marked:
                image[BOX[1]:BOX[3], BOX[0]:BOX[2]][MARK] = 255
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            if vcodec == "libx264":
                frame.pts, frame.time_base = int(t * TICKS), Fraction(1, TICKS)
            else:
                frame.pts = k
            out.mux(video.encode(frame))
        out.mux(video.encode())
        pcm = np.zeros(int(seconds * sample_rate), np.float32)
        for i in marks:
            pcm[i * sample_rate // 25] = 0.9  # exact: i/25 s is a whole number of samples
        fmt = "s16" if acodec.startswith("pcm") else "fltp"
        for start in range(0, len(pcm), 1024):
            chunk = pcm[None, start:start + 1024]
            if fmt == "s16":
                chunk = np.round(chunk * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=fmt,
                                               layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            out.mux(audio.encode(frame))
        out.mux(audio.encode())
    return marks


def is_marked(window: np.ndarray) -> bool:
    """Marker test on a (3, H, W) float crop or a (H, W, 3) uint8 image."""
    region = window[:, MARK[0], MARK[1]] if window.ndim == 3 and window.shape[0] == 3 else None
    if region is None:
        return window[MARK[0], MARK[1]].mean() > 128
    return region.mean() > 0.5


CASES = {
    "25fps-mpeg4-aac48k": ("25", "mpeg4", "aac", 48000, "mp4"),
    "29.97fps-h264-pcm44k1": ("29.97", "libx264", "pcm_s16le", 44100, "mkv"),
    "30fps-h264-aac44k1": ("30", "libx264", "aac", 44100, "mp4"),
    "vfr-h264-aac48k": ("vfr", "libx264", "aac", 48000, "mp4"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_click_lands_in_the_predicted_mel_column(case: str, tmp_path: Path) -> None:
    kind, vcodec, acodec, rate, ext = CASES[case]
    src = tmp_path / f"clip.{ext}"
    marks = write_clip(src, kind, vcodec, acodec, rate)
    assert len(marks) >= 8
    out = tmp_path / "prepared"
    rec = pp.preprocess([src], out, detector=FixedBox(), test_fraction=0.0)[0]
    assert rec.status == "ok", rec.reason
    assert rec.variable_rate == (kind == "vfr")
    assert abs(rec.audio_offset) < 1e-3

    # The marker is on exactly the timeline frames whose instant the click marks.
    clip = out / "clip"
    on = {int(p.stem) for p in clip.glob("*.jpg") if is_marked(cv2.imread(str(p)))}
    assert on == set(marks)

    for offset in (-1, 0):
        dataset = WindowDataset(out, "train", length=300, mel_offset_frames=offset,
                                deterministic=True)
        checked: set[int] = set()
        for index in range(len(dataset)):
            rng = dataset._rng(index)
            rng.randrange(len(dataset.clips))
            start = rng.choice(dataset.starts[0])
            if not any(start + k in marks for k in range(5)):
                continue
            sample = dataset[index]
            for k in range(5):
                frame = start + k
                target = sample["target"][:, k].numpy()
                assert is_marked(target) == (frame in marks), (frame, start)
                if frame not in marks:
                    continue
                loudness = sample["mel"][k, 0].mean(dim=0)  # mean over mel bins, per column
                expected = frame_instant_column(frame, offset)
                assert int(loudness.argmax()) == expected, (
                    f"{case} offset {offset}: frame {frame} click in column "
                    f"{int(loudness.argmax())}, convention says {expected} (window starts at "
                    f"clip column {mel_start(frame, offset)})"
                )
                checked.add(frame)
        assert len(checked) >= len(marks) - 1, (sorted(checked), sorted(marks))


def test_convention_values() -> None:
    # Frame i's instant is clip column round(3.2 i); the training window starts one frame early.
    assert [frame_instant_column(i, -1) for i in range(1, 6)] == [3, 3, 4, 4, 4]
    assert [frame_instant_column(i, 0) for i in range(5)] == [0, 0, 0, 1, 1]
    assert [mel_start(i, -1) for i in range(1, 7)] == [0, 3, 6, 9, 12, 16]
    for i in range(1, 500):
        assert mel_start(i, -1) == int(80.0 * ((i - 1) / 25.0)), i  # the original's formula
        assert mel_start(i, 0) == int(80.0 * (i / 25.0)), i
        assert 3 <= frame_instant_column(i, -1) <= 4
