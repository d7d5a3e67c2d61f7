"""data.preprocess: 25 fps timeline, split, layout on real and synthetic clips, robustness."""

from __future__ import annotations

import json
import wave
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from data import preprocess as pp

REAL_CLIPS = ("vid_retalking2_844sq_25fps.mp4", "vid_retalking4_700sq_30fps.mp4")


# --- 25 fps timeline --------------------------------------------------------------------------


def test_timeline_from_30fps_picks_latest_frame() -> None:
    times = [Fraction(k, 30) for k in range(199)]  # 6.63 s of 30 fps
    sources = pp.timeline_sources(times)
    assert len(sources) == 165  # floor(199 / 30 * 25), not 199
    assert sources == [i * 30 // 25 for i in range(165)]


def test_timeline_accepts_inexact_float_stamps() -> None:
    # k * (1/30) drifts in the last bits; index 5 (0.2 s) must still get frame 6 (0.2 s).
    times = [k * (1 / 30) for k in range(60)]
    sources = pp.timeline_sources(times)
    assert len(sources) == 50 and sources[5] == 6 and sources[10] == 12


def test_timeline_identity_at_25fps_and_offset_start() -> None:
    times = [10.0 + k / 25 for k in range(125)]
    assert pp.timeline_sources(times) == list(range(125))


def test_timeline_duplicates_slow_and_variable_rate() -> None:
    assert pp.timeline_sources([k / 10 for k in range(5)]) == [
        0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4,
    ]  # 10 fps: 0.5 s gives 12 indices, frames repeated
    # Variable rate: frame 2 is replaced before the next 25 fps tick, so no index shows it.
    sources = pp.timeline_sources([0.0, 0.1, 0.5, 0.52], end=0.6)
    assert sources == [0, 0, 0] + [1] * 10 + [3, 3]


# --- split and discovery ----------------------------------------------------------------------


def test_split_rules() -> None:
    names = [f"spk{k % 3}/{k:05d}" for k in range(10)]
    train, val = pp.split_clips(names, 0.2, seed=0)
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val)
    assert pp.split_clips(reversed(names), 0.2, seed=0) == (train, val)
    assert pp.split_clips(names, 0.2, seed=1) != (train, val)
    assert pp.split_clips(["a", "b"], 0.0) in ((["a"], ["b"]), (["b"], ["a"]))
    assert pp.split_clips(["a", "b"], 0.9)[0]  # train keeps one
    assert pp.split_clips(["only"]) == (["only"], ["only"])


def test_find_clips_names_nested_paths(tmp_path: Path) -> None:
    main = tmp_path / "lrs2" / "main"
    for rel in ("spk1/00001.mp4", "spk1/00002.MP4", "spk2/00001.mp4", "spk2/notes.txt"):
        (main / rel).parent.mkdir(parents=True, exist_ok=True)
        (main / rel).touch()
    (main / ".hidden").mkdir()
    (main / ".hidden" / "x.mp4").touch()
    (main / "out").mkdir()
    (main / "out" / "y.mp4").touch()  # the output root inside the input is not an input
    clips = pp.find_clips([main], main / "out")
    assert [name for name, _ in clips] == ["spk1/00001", "spk1/00002", "spk2/00001"]
    with pytest.raises(pp.PreprocessError, match="input not found"):
        pp.find_clips([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pp.PreprocessError, match="no video files"):
        pp.find_clips([tmp_path / "empty"], tmp_path / "out")


def test_cli_missing_input_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert pp.main(["--input", str(tmp_path / "nope.mp4"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: input not found") and "\n" not in err
    assert not (tmp_path / "o").exists()


# --- synthetic clips (no shared media needed) -------------------------------------------------


def make_clip(path: Path, fps: int = 30, seconds: float = 1.0, audio: bool = True) -> None:
    """A tiny H.264 clip of noise frames with a 440 Hz tone."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        tone = out.add_stream("aac", rate=44100) if audio else None
        for _ in range(round(fps * seconds)):
            img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(img, format="bgr24")))
        out.mux(video.encode())
        if tone is not None:
            t = np.arange(round(44100 * seconds)) / 44100
            pcm = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            for start in range(0, pcm.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(pcm[:, start:start + 1024]), format="fltp", layout="mono"
                )
                frame.sample_rate = 44100
                out.mux(tone.encode(frame))
            out.mux(tone.encode())


class FixedBox:
    """A stub detector: a fixed box, except on every ``miss_every``-th call."""

    def __init__(self, miss_every: int = 0) -> None:
        self.calls = 0
        self.miss_every = miss_every

    def detect(self, frame_bgr: np.ndarray) -> pp.Box | None:
        self.calls += 1
        if self.miss_every and self.calls % self.miss_every == 0:
            return None
        return 8, 4, 56, 60


class Exploding:
    def detect(self, frame_bgr: np.ndarray) -> pp.Box | None:
        raise RuntimeError("detector crashed\nsecond line")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    (root / "spk").mkdir()
    make_clip(root / "spk" / "a30.mp4", fps=30, seconds=2.0)
    make_clip(root / "spk" / "b25.mp4", fps=25, seconds=1.0)
    make_clip(root / "mute.mp4", fps=25, seconds=1.0, audio=False)
    return root


def test_synthetic_layout_with_stub_detector(synthetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / ".tmp-spk--a30").mkdir(parents=True)  # debris of an interrupted run
    records = pp.preprocess([synthetic], out, detector=FixedBox(miss_every=4))
    by_name = {r.name: r for r in records}
    assert set(by_name) == {"spk/a30", "spk/b25", "mute"}
    a30 = by_name["spk/a30"]
    assert a30.status == "ok" and a30.frames_kept + a30.frames_dropped == 50
    assert a30.frames_dropped > 0 and a30.source_fps == 30.0
    jpgs = sorted(int(p.stem) for p in (out / "spk" / "a30").glob("*.jpg"))
    assert len(jpgs) == a30.frames_kept and max(jpgs) <= 49
    assert cv2.imread(str(out / "spk" / "a30" / f"{jpgs[0]}.jpg")).shape == (56, 48, 3)
    assert by_name["mute"].status == "rejected" and "no audio" in by_name["mute"].reason
    assert not list(out.glob(".tmp-*")) and not (out / "mute").exists()
    train = (out / "train.txt").read_text().split()
    val = (out / "val.txt").read_text().split()
    assert sorted(train + val) == ["spk/a30", "spk/b25"] and len(val) == 1
    assert json.loads((out / "summary.json").read_text())[0]["name"] == "mute"


def test_crash_and_no_face_reject_cleanly(synthetic: Path, tmp_path: Path) -> None:
    clip = synthetic / "spk" / "b25.mp4"
    rec = pp.preprocess([clip], tmp_path / "crash", detector=Exploding())[0]
    assert rec.status == "rejected" and rec.reason == "RuntimeError: detector crashed"
    assert [p.name for p in (tmp_path / "crash").iterdir()] == ["summary.json"]
    assert not (tmp_path / "crash" / "train.txt").exists()

    rec = pp.preprocess([clip], tmp_path / "noface")[0]  # Haar finds nothing in noise
    assert rec.status == "rejected" and rec.reason.startswith("no face")
    assert rec.frames_dropped == 25 and not list((tmp_path / "noface").glob(".tmp-*"))


# --- real clips --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_root(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("lrs2")
    records = pp.preprocess([samples_dir / name for name in REAL_CLIPS], out)
    return out, records


@pytest.mark.slow
def test_real_clips_layout(real_root) -> None:
    out, records = real_root
    expected = {"vid_retalking2_844sq_25fps": 125, "vid_retalking4_700sq_30fps": 165}
    for rec in records:
        assert rec.status == "ok", rec.reason
        assert rec.frames_kept + rec.frames_dropped == expected[rec.name]
        assert rec.frames_kept > 0.8 * expected[rec.name]
        clip = out / rec.name
        indices = sorted(int(p.stem) for p in clip.glob("*.jpg"))
        assert len(indices) == rec.frames_kept and indices[-1] < expected[rec.name]
        for i in indices[:: max(1, len(indices) // 5)]:
            h, w = cv2.imread(str(clip / f"{i}.jpg")).shape[:2]
            assert 50 < min(h, w) and max(h, w) < 844
        with wave.open(str(clip / "audio.wav")) as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
            assert abs(wav.getnframes() / 16000 - expected[rec.name] / 25) < 0.1
    train = (out / "train.txt").read_text().split()
    val = (out / "val.txt").read_text().split()
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(expected)


@pytest.mark.slow
def test_real_rerun_is_noop(real_root, samples_dir: Path) -> None:
    out, first = real_root
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    again = pp.preprocess([samples_dir / name for name in REAL_CLIPS], out)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert [r.frames_kept for r in again] == [r.frames_kept for r in first]
    assert [r.split for r in again] == [r.split for r in first]
    assert stamp == {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}


def test_photos_rejected_without_traceback(samples_dir: Path, tmp_path: Path, capsys) -> None:
    photos = [samples_dir / "img_obama_single.jpg", samples_dir / "img_noface_horses.jpg"]
    code = pp.main(["--input", *map(str, photos), "--output", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert captured.out.count("no audio stream") == 2
    assert not (tmp_path / "o" / "train.txt").exists()
    assert not (tmp_path / "o" / "val.txt").exists()
