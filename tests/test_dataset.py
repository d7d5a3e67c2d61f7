"""Training windows on a generated layout: shapes, masking, mel indexing, formats, bad folders."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data import pack
from data.audio import MEL_STEP, load_audio, melspectrogram
from data.dataset import (
    MEL_CACHE,
    PACKED_FRAMES,
    DataError,
    Wav2LipDataModule,
    WindowDataset,
    load_mel,
    mel_start,
)
from data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "sample", n_clips=3, n_val=1)


def test_window_shapes_and_masked_rows(sample_root: Path) -> None:
    dataset = WindowDataset(sample_root, "train", length=4, deterministic=True)
    sample = dataset[0]
    assert sample["face"].shape == (6, 5, 96, 96)
    assert sample["mel"].shape == (5, 1, 80, 16)
    assert sample["target"].shape == (3, 5, 96, 96)
    face, target = sample["face"], sample["target"]
    assert torch.all(face[:3, :, 48:] == 0), "lower half of the input window must be zeroed"
    assert torch.equal(face[:3, :, :48], target[:, :, :48]), "upper half is the target's"
    assert face[:3, :, :48].abs().sum() > 0 and face[3:, :, 48:].abs().sum() > 0
    assert 0.0 <= float(target.min()) and float(target.max()) <= 1.0
    # The reference window comes from another time of the clip, not the target window itself.
    assert not torch.equal(face[3:], target)


def test_windows_are_bgr_frames_scaled_to_unit_range(sample_root: Path) -> None:
    dataset = WindowDataset(sample_root, "train", length=1, deterministic=True)
    clip = dataset.clips[0]
    start = dataset.starts[0][0]
    window = dataset._read_window(clip, start)
    image = cv2.resize(cv2.imread(str(clip.path / f"{start}.jpg")), (96, 96))
    assert torch.allclose(torch.from_numpy(window[:, 0]), torch.from_numpy(image).permute(2, 0, 1)
                          .float() / 255)


def test_mel_windows_follow_the_training_offset(sample_root: Path) -> None:
    dataset = WindowDataset(sample_root, "val", length=1, deterministic=True)
    clip = dataset.clips[0]
    # Frame 10 at 25 fps with the original's training offset starts one frame (3.2 columns)
    # earlier: int(80 * 9 / 25) = 28; at inference (offset 0) int(80 * 10 / 25) = 32.
    assert mel_start(10, -1) == 28 and mel_start(10, 0) == 32
    assert mel_start(1, -1) == 0
    starts = clip.window_starts(-1)
    assert 0 not in starts, "frame 0 has no mel one frame earlier"
    last = max(starts)
    assert mel_start(last + 4, -1) + MEL_STEP <= clip.mel.shape[1]


def test_sample_mels_are_the_clip_columns(sample_root: Path) -> None:
    dataset = WindowDataset(sample_root, "val", length=1, deterministic=True)
    rng_state = dataset._rng(0)
    which = rng_state.randrange(len(dataset.clips))
    start = rng_state.choice(dataset.starts[which])
    mels = dataset[0]["mel"]
    clip = dataset.clips[which]
    for k in range(5):
        begin = mel_start(start + k, -1)
        assert torch.equal(mels[k, 0], clip.mel[:, begin:begin + MEL_STEP])


def test_datamodule_batches(sample_root: Path) -> None:
    datamodule = Wav2LipDataModule(str(sample_root), batch_size=3, train_samples=6, val_samples=2)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["face"].shape == (3, 6, 5, 96, 96) and batch["mel"].shape == (3, 5, 1, 80, 16)


def test_empty_folder_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train.txt does not exist") as err:
        Wav2LipDataModule(str(tmp_path)).setup("fit")
    assert "\n" not in str(err.value)
    (tmp_path / "train.txt").write_text("\n")
    with pytest.raises(DataError, match="lists no clips"):
        Wav2LipDataModule(str(tmp_path)).setup("fit")


def test_clip_too_short_for_window_and_reference(sample_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "short"
    clip = root / "speaker" / "00001"
    shutil.copytree(sample_root / "synthetic" / "clip00", clip)
    for jpg in clip.glob("*.jpg"):
        if int(jpg.stem) >= 15:  # keep 15 frames: the original needs more than 15
            jpg.unlink()
    (root / "train.txt").write_text("speaker/00001\n")
    with pytest.raises(DataError, match="too short") as err:
        WindowDataset(root, "train", length=1)
    assert "\n" not in str(err.value) and "15 frames" in str(err.value)


# --- mel cache, packed format, bad filelists ----------------------------------------------------


def test_mel_is_cached_once_per_clip(sample_root: Path) -> None:
    clip_dir = sample_root / "synthetic" / "clip00"
    cache = clip_dir / MEL_CACHE
    cache.unlink(missing_ok=True)
    mel = load_mel(clip_dir)
    assert cache.is_file()
    assert torch.equal(mel, melspectrogram(load_audio(clip_dir / "audio.wav")))
    stamp = cache.stat().st_mtime_ns
    assert torch.equal(load_mel(clip_dir), mel) and cache.stat().st_mtime_ns == stamp


def test_packed_samples_equal_jpg_samples(sample_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "packed"
    shutil.copytree(sample_root, root)
    with pytest.raises(DataError, match="is not packed; run `python -m data.pack"):
        WindowDataset(root, "train", length=1, data_format="packed")
    assert pack.main([str(root), "--workers", "1"]) == 0
    assert pack.pack_root(root) == (0, 3)  # idempotent: nothing left to pack
    frames = np.load(root / "synthetic" / "clip01" / PACKED_FRAMES, mmap_mode="r")
    assert frames.dtype == np.uint8 and frames.shape == (75, 96, 96, 3)
    jpg = WindowDataset(root, "train", length=6, deterministic=True)
    packed = WindowDataset(root, "train", length=6, deterministic=True, data_format="packed")
    for i in range(6):
        a, b = jpg[i], packed[i]
        for key in ("face", "mel", "target"):
            assert torch.equal(a[key], b[key]), key


def test_datamodule_packs_on_prepare(tmp_path: Path) -> None:
    datamodule = Wav2LipDataModule(str(tmp_path / "gen"), batch_size=2, train_samples=2,
                                   val_samples=2, synthetic=True, format="packed")
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["face"].shape == (2, 6, 5, 96, 96) and batch["mel"].shape == (2, 5, 1, 80, 16)
    with pytest.raises(DataError, match="data.format must be one of jpg, packed"):
        Wav2LipDataModule(str(tmp_path), format="png")


def test_filelist_naming_missing_clips_is_one_line(sample_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "missing"
    shutil.copytree(sample_root, root)
    (root / "train.txt").write_text("synthetic/clip01\nsynthetic/gone1\nspk/gone2\n")
    with pytest.raises(DataError, match=r"2 of 3 clips listed in .*train.txt are missing") as err:
        Wav2LipDataModule(str(root)).setup("fit")
    assert "\n" not in str(err.value) and "synthetic/gone1" in str(err.value)
    assert pack.main([str(root)]) == 2
    assert not (root / "synthetic" / "clip01" / PACKED_FRAMES).exists(), "no partial output"


# --- expert SyncNet windows ---------------------------------------------------------------------


def _drawn_window(dataset: WindowDataset, index: int) -> tuple[int, int]:
    """(clip index, start frame) of deterministic sample ``index``, replaying its generator."""
    rng = dataset._rng(index)
    which = rng.randrange(len(dataset.clips))
    return which, rng.choice(dataset.starts[which])


def test_sync_mel_is_the_offset_zero_window(sample_root: Path) -> None:
    dataset = WindowDataset(sample_root, "train", length=3, deterministic=True)
    for index in range(3):
        which, start = _drawn_window(dataset, index)
        sample = dataset[index]
        assert "sync_mels" not in sample, "no offsets unless sync_offsets > 0"
        begin = mel_start(start, 0)
        # The expert's window starts at the frame's own time, one frame after its training input.
        assert begin == mel_start(start + 1, -1)
        expected = dataset.clips[which].mel[:, begin:begin + MEL_STEP]
        assert sample["sync_mel"].shape == (1, 80, 16)
        assert torch.equal(sample["sync_mel"][0], expected)


def test_sync_mels_cover_every_offset(sample_root: Path) -> None:
    k = 3
    dataset = WindowDataset(sample_root, "val", length=4, deterministic=True, seed=5,
                            sync_offsets=k)
    columns = dataset.clips[0].mel.shape[1]
    starts = dataset.starts[0]
    # 75 frames, 241 mel columns: the first start s needs mel_start(s - k, 0) >= 0, so s >= k;
    # the last needs mel_start(s + k, 0) + 16 <= 241, so s + k <= 70. Without offsets the
    # training input (one frame early) already bounds both ends: starts 1..67.
    assert columns == 241 and starts == list(range(k, 71 - k))
    baseline = WindowDataset(sample_root, "val", length=1, deterministic=True)
    assert baseline.starts[0] == list(range(1, 68))
    again = WindowDataset(sample_root, "val", length=4, deterministic=True, seed=5,
                          sync_offsets=k)
    for index in range(4):
        which, start = _drawn_window(dataset, index)
        sample = dataset[index]
        mels = sample["sync_mels"]
        assert mels.shape == (2 * k + 1, 1, 80, 16)
        for row in range(2 * k + 1):
            begin = mel_start(start + row - k, 0)
            assert torch.equal(mels[row, 0], dataset.clips[which].mel[:, begin:begin + MEL_STEP])
        assert torch.equal(mels[k], sample["sync_mel"])
        repeat = again[index]
        assert all(torch.equal(sample[key], repeat[key]) for key in sample), "not deterministic"


def test_sync_offsets_apply_to_validation_only(sample_root: Path) -> None:
    datamodule = Wav2LipDataModule(str(sample_root), batch_size=2, train_samples=2,
                                   val_samples=2, sync_offsets=2)
    datamodule.setup("fit")
    train = next(iter(datamodule.train_dataloader()))
    val = next(iter(datamodule.val_dataloader()))
    assert train["sync_mel"].shape == val["sync_mel"].shape == (2, 1, 80, 16)
    assert "sync_mels" not in train
    assert val["sync_mels"].shape == (2, 5, 1, 80, 16)


def test_bad_sync_offsets_are_one_line_errors(sample_root: Path) -> None:
    with pytest.raises(DataError, match="sync_offsets must be an int >= 0") as err:
        WindowDataset(sample_root, "val", length=1, sync_offsets=-1)
    assert "\n" not in str(err.value)
    # 75-frame clips cannot fit 40 frames of audio on each side of a 5-frame window.
    with pytest.raises(DataError, match="too short.*sync_offsets=40") as err:
        WindowDataset(sample_root, "val", length=1, sync_offsets=40)
    assert "\n" not in str(err.value)
