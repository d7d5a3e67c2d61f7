"""data.preprocess with data.faces and data.video: 25 fps timeline, split, layout, robustness."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import wave
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from data import preprocess as pp
from data.audio import load_audio, melspectrogram
from data.errors import ClipRejected, PreprocessError
from data.faces import Box, FacePolicy, HaarFaceDetector, choose_face
from data.video import timeline_sources

REAL_CLIPS = (
    "vid_retalking2_844sq_25fps.mp4",
    "vid_retalking4_700sq_30fps.mp4",
    "vid_sadtalker_katiehill_512_mpeg4.mp4",
)
# Timeline frames (25 fps), source rate and audio seconds of each sample (shared/SOURCES.md).
REAL_FACTS = {
    "vid_retalking2_844sq_25fps": (125, 25.0, 5.02),
    "vid_retalking4_700sq_30fps": (165, 30.0, 6.59),
    "vid_sadtalker_katiehill_512_mpeg4": (200, 25.0, 8.0),
}


# --- 25 fps timeline --------------------------------------------------------------------------


def test_timeline_from_30fps_picks_latest_frame() -> None:
    times = [Fraction(k, 30) for k in range(199)]  # 6.63 s of 30 fps
    sources = timeline_sources(times)
    assert len(sources) == 165  # floor(199 / 30 * 25), not 199
    assert sources == [i * 30 // 25 for i in range(165)]


def test_timeline_accepts_inexact_float_stamps() -> None:
    # k * (1/30) drifts in the last bits; index 5 (0.2 s) must still get frame 6 (0.2 s).
    times = [k * (1 / 30) for k in range(60)]
    sources = timeline_sources(times)
    assert len(sources) == 50 and sources[5] == 6 and sources[10] == 12


def test_timeline_identity_at_25fps_and_offset_start() -> None:
    times = [10.0 + k / 25 for k in range(125)]
    assert timeline_sources(times) == list(range(125))


def test_timeline_duplicates_slow_and_variable_rate() -> None:
    assert timeline_sources([k / 10 for k in range(5)]) == [
        0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4,
    ]  # 10 fps: 0.5 s gives 12 indices, frames repeated
    # Variable rate: frame 2 is replaced before the next 25 fps tick, so no index shows it.
    sources = timeline_sources([0.0, 0.1, 0.5, 0.52], end=0.6)
    assert sources == [0, 0, 0] + [1] * 10 + [3, 3]


# --- split and discovery ----------------------------------------------------------------------


def test_split_rules() -> None:
    names = [f"spk{k % 3}/{k:05d}" for k in range(20)]
    splits = pp.split_clips(names, 0.1, seed=0, test_fraction=0.1)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [16, 2, 2]
    assert sorted(sum(splits.values(), [])) == sorted(names), "every clip in exactly one split"
    assert pp.split_clips(reversed(names), 0.1, seed=0, test_fraction=0.1) == splits
    assert pp.split_clips(names, 0.1, seed=1, test_fraction=0.1) != splits
    assert pp.split_clips(["a", "b"], 0.0)["test"] == []
    assert sorted(pp.split_clips(["a", "b"], 0.0)["train"] + pp.split_clips(["a", "b"])["val"])
    assert [len(v) for v in pp.split_clips(["a", "b", "c"], 0.1, 0, 0.1).values()] == [1, 1, 1]
    assert pp.split_clips(["a", "b"], 0.9)["train"]  # train keeps one
    assert pp.split_clips(["only"]) == {"train": ["only"], "val": ["only"], "test": []}


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
    with pytest.raises(PreprocessError, match="input not found"):
        pp.find_clips([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreprocessError, match="no video files"):
        pp.find_clips([tmp_path / "empty"], tmp_path / "out")


def test_cli_missing_input_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert pp.main(["--input", str(tmp_path / "nope.mp4"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: input not found") and "\n" not in err
    assert not (tmp_path / "o").exists()


# --- synthetic clips (no shared media needed) -------------------------------------------------


def make_clip(
    path: Path,
    fps: int = 30,
    seconds: float = 1.0,
    audio: bool = True,
    audio_seconds: float | None = None,
    amplitude: float = 0.3,
) -> None:
    """A tiny H.264 clip of noise frames with a 440 Hz tone (silence at ``amplitude=0``)."""
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
            t = np.arange(round(44100 * (audio_seconds or seconds))) / 44100
            pcm = (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
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

    def detect(self, frame_bgr: np.ndarray) -> Box | None:
        self.calls += 1
        if self.miss_every and self.calls % self.miss_every == 0:
            return None
        return 8, 4, 56, 60


class Exploding:
    def detect(self, frame_bgr: np.ndarray) -> Box | None:
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
    # The cached mel is exactly what the dataset would compute from audio.wav.
    mel = melspectrogram(load_audio(out / "spk" / "a30" / "audio.wav"))
    assert torch.equal(torch.from_numpy(np.load(out / "spk" / "a30" / "mel.npy")), mel)
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
    written = sorted(p.name for p in (tmp_path / "crash").iterdir())
    assert written == ["summary.json", "summary.txt"]
    assert not (tmp_path / "crash" / "train.txt").exists()

    rec = pp.preprocess([clip], tmp_path / "noface")[0]  # Haar finds nothing in noise
    assert rec.status == "rejected" and rec.reason.startswith("no usable face")
    assert rec.frames_dropped == 25 and not list((tmp_path / "noface").glob(".tmp-*"))


# --- real clips --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_root(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("lrs2")
    records = pp.preprocess([samples_dir / name for name in REAL_CLIPS], out, workers=2)
    return out, records


@pytest.mark.slow
def test_real_clips_layout(real_root) -> None:
    out, records = real_root
    summary = {r["name"]: r for r in json.loads((out / "summary.json").read_text())}
    assert set(summary) == set(REAL_FACTS)
    for rec in records:
        frames, fps, seconds = REAL_FACTS[rec.name]
        assert rec.status == "ok", rec.reason
        assert rec.frames_kept + rec.frames_dropped == frames
        assert rec.frames_kept > 0.8 * frames
        assert rec.source_fps == fps and not rec.variable_rate
        assert abs(rec.audio_seconds - seconds) < 0.05
        row = summary[rec.name]  # what the summary reports for each clip
        assert (row["frames_kept"], row["frames_dropped"]) == (rec.frames_kept, rec.frames_dropped)
        assert row["source_fps"] == fps and row["audio_seconds"] == rec.audio_seconds
        assert json.loads((out / rec.name / "record.json").read_text())["frames_kept"] == (
            rec.frames_kept)
        clip = out / rec.name
        indices = sorted(int(p.stem) for p in clip.glob("*.jpg"))
        assert len(indices) == rec.frames_kept and indices[-1] < frames
        for i in indices[:: max(1, len(indices) // 5)]:
            h, w = cv2.imread(str(clip / f"{i}.jpg")).shape[:2]
            assert 50 < min(h, w) and max(h, w) < 844
        with wave.open(str(clip / "audio.wav")) as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
            assert abs(wav.getnframes() / 16000 - frames / 25) < 0.1
        assert np.load(clip / "mel.npy").shape == (80, 1 + int(rec.audio_seconds * 16000) // 200)
    splits = [(out / f"{s}.txt").read_text().split() for s in ("train", "val", "test")]
    assert all(len(names) == 1 for names in splits)
    assert sorted(sum(splits, [])) == sorted(REAL_FACTS)
    table = (out / "summary.txt").read_text()
    assert "src_fps" in table and "30.00" in table and "3/3 clips usable" in table


@pytest.mark.slow
def test_real_rerun_is_noop(real_root, samples_dir: Path) -> None:
    out, first = real_root
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    again = pp.preprocess([samples_dir / name for name in REAL_CLIPS], out)
    assert [r.status for r in again] == ["skipped"] * 3
    assert [r.frames_kept for r in again] == [r.frames_kept for r in first]
    assert [r.split for r in again] == [r.split for r in first]
    assert stamp == {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    # Other face options: the old crops are not passed off as made with them.
    lists = {p.name: p.read_text() for p in out.glob("*.txt")}
    summary = (out / "summary.json").read_bytes()
    other = pp.preprocess([samples_dir / name for name in REAL_CLIPS], out,
                          policy=FacePolicy(min_face=400, pads=(0, 10, 0, 0)))
    assert [r.status for r in other] == ["rejected"] * 3
    assert all(r.reason.startswith("already preprocessed with other min_face, pads (min_face=40, "
                                   "pads=[0, 0, 0, 0]); remove ") for r in other), other[0].reason
    assert stamp == {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    assert {p.name: p.read_text() for p in out.glob("*.txt") if p.name != "summary.txt"} == {
        k: v for k, v in lists.items() if k != "summary.txt"}
    (out / "summary.json").write_bytes(summary)  # the module's other tests read the first run's
    (out / "summary.txt").write_text(lists["summary.txt"])


def test_photos_rejected_without_traceback(samples_dir: Path, tmp_path: Path, capsys) -> None:
    photos = [samples_dir / "img_obama_single.jpg", samples_dir / "img_noface_horses.jpg"]
    code = pp.main(["--input", *map(str, photos), "--output", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert captured.out.count("no audio stream") == 2
    assert captured.out.count("no face in its first frame") == 1  # only the horses
    assert not (tmp_path / "o" / "train.txt").exists()
    assert not (tmp_path / "o" / "val.txt").exists()


# --- face policy, smoothing, padding, reduced-scale detection ----------------------------------


def test_choose_face_policy() -> None:
    policy = FacePolicy(min_face=40)
    big, small, other = (0, 0, 100, 120), (0, 0, 30, 30), (200, 0, 260, 60)
    assert choose_face([], policy) == (None, "no_face")
    assert choose_face([small], policy) == (None, "tiny_face")
    assert choose_face([small, big], policy) == (big, "")
    assert choose_face([other, big], policy) == (big, "several_faces")
    skip = FacePolicy(min_face=40, multi_face="skip")
    assert choose_face([other, big], skip) == (None, "several_faces")
    with pytest.raises(ClipRejected, match="2 faces in one frame"):
        choose_face([other, big], FacePolicy(multi_face="reject"))
    with pytest.raises(PreprocessError, match="multi_face must be one of"):
        FacePolicy(multi_face="first")
    with pytest.raises(PreprocessError, match="smooth"):
        FacePolicy(smooth=0)


class Jitter:
    """Boxes alternating by +-4 px, so smoothing is visible in the crop sizes."""

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, frame_bgr: np.ndarray) -> list[Box]:
        self.calls += 1
        d = 4 if self.calls % 2 else -4
        return [(10, 10, 50 + d, 50 + d)]


class TwoFaces:
    def detect(self, frame_bgr: np.ndarray) -> list[Box]:
        return [(0, 0, 44, 44), (10, 10, 60, 60)]


def _crop_sizes(root: Path, name: str) -> set[tuple[int, int]]:
    return {cv2.imread(str(p)).shape[:2] for p in (root / name).glob("*.jpg")}


def test_smoothing_padding_and_multi_face_counts(synthetic: Path, tmp_path: Path) -> None:
    clip = synthetic / "spk" / "b25.mp4"
    pp.preprocess([clip], tmp_path / "raw", detector=Jitter(), policy=FacePolicy(20, smooth=1))
    assert _crop_sizes(tmp_path / "raw", "b25") == {(36, 36), (44, 44)}
    pp.preprocess([clip], tmp_path / "smooth", detector=Jitter(),
                  policy=FacePolicy(20, smooth=5, pads=(0, 10, 2, 3)))
    sizes = _crop_sizes(tmp_path / "smooth", "b25")
    # Interior frames average 5 alternating boxes: 40 +- 1.6 px, then 10 px down, 5 px across.
    assert all(48 <= h <= 52 and 43 <= w <= 47 for h, w in sizes), sizes

    rec = pp.preprocess([clip], tmp_path / "two", detector=TwoFaces())[0]
    assert rec.status == "ok" and rec.several_faces_kept == 25
    assert _crop_sizes(tmp_path / "two", "b25") == {(50, 50)}  # the largest face
    rec = pp.preprocess([clip], tmp_path / "skip", detector=TwoFaces(),
                        policy=FacePolicy(multi_face="skip"))[0]
    assert rec.status == "rejected" and rec.dropped == {"several_faces": 25}
    rec = pp.preprocess([clip], tmp_path / "rej", detector=TwoFaces(),
                        policy=FacePolicy(multi_face="reject"))[0]
    assert rec.status == "rejected" and "faces in one frame" in rec.reason
    assert not (tmp_path / "rej" / "b25").exists()


def test_haar_detects_at_reduced_scale_in_full_resolution_pixels(samples_dir: Path) -> None:
    photo = cv2.imread(str(samples_dir / "img_obama_single.jpg"))
    detector = HaarFaceDetector(max_side=360)
    (box,) = detector.detect(photo)
    big = cv2.resize(photo, None, fx=2, fy=2)  # 1820x2274, beyond 1080p
    (big_box,) = detector.detect(big)
    assert all(abs(b - 2 * a) <= 0.05 * (box[2] - box[0]) for a, b in zip(box, big_box))
    assert big_box[2] <= big.shape[1] and big_box[3] <= big.shape[0]


# --- bad input: one line, no partial output ----------------------------------------------------


def test_bad_clips_are_rejected_in_one_line(synthetic: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    make_clip(bad / "short.mp4", fps=25, seconds=1.0, audio_seconds=0.15)
    make_clip(bad / "silent.mp4", fps=25, seconds=1.0, amplitude=0.0)
    shutil.copy(synthetic / "mute.mp4", bad / "mute.mp4")
    out = tmp_path / "out"
    records = {r.name: r for r in pp.preprocess([bad], out, detector=FixedBox())}
    assert "unreadable" in records["junk"].reason
    assert "shorter than one 0.2 s mel window" in records["short"].reason
    assert "no audio stream" in records["mute"].reason
    assert "audio is silent (peak" in records["silent"].reason
    for rec in records.values():
        assert rec.status == "rejected" and "\n" not in rec.reason
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "summary.txt"]


def test_cli_empty_folder_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code = pp.main(["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: no video files") and "\n" not in err
    assert not (tmp_path / "o").exists()


# --- interrupted runs --------------------------------------------------------------------------

DRIVER = """
import sys, time
from data import preprocess as pp

class Slow:
    def detect(self, frame):
        time.sleep(float(sys.argv[3]))
        return [(8, 4, 56, 60)]

if __name__ == "__main__":  # worker processes are spawned and import this file
    pp.preprocess([sys.argv[1]], sys.argv[2], detector=Slow(), workers=int(sys.argv[4]))
"""


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith("summary.")}


def _summary(root: Path) -> list[dict]:
    drop = ("status", "reason")
    rows = json.loads((root / "summary.json").read_text())
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_output(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    (videos / "spk").mkdir(parents=True)
    for k in range(4):
        make_clip(videos / "spk" / f"{k:05d}.mp4", fps=25 + 5 * (k % 2), seconds=1.6)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    repo = Path(__file__).resolve().parents[1]

    def run(out: Path, delay: float, workers: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(driver), str(videos), str(out), str(delay),
                                 str(workers)], cwd=repo, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(repo)})

    reference = tmp_path / "reference"
    assert run(reference, 0.0, 2).wait(timeout=300) == 0  # uninterrupted, two workers

    out = tmp_path / "out"
    proc = run(out, 0.03, 1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill mid-clip, once one clip is finished
        done = [p for p in out.glob("spk/*") if (p / "audio.wav").is_file()]
        partial = [p for p in out.glob(".tmp-*") if any(p.glob("*.jpg"))]
        if done and partial:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert partial and not (out / "summary.json").exists(), "not killed mid-run"
    finished = len(done)

    assert run(out, 0.0, 1).wait(timeout=300) == 0
    assert not list(out.glob(".tmp-*"))
    assert _tree(out) == _tree(reference)
    assert _summary(out) == _summary(reference)
    statuses = [r["status"] for r in json.loads((out / "summary.json").read_text())]
    assert statuses.count("skipped") >= finished and set(statuses) <= {"ok", "skipped"}
