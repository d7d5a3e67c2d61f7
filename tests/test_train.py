"""The main job end to end: Hydra multirun, offline W&B metrics, exports, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from data.dataset import DataError
from data.synthetic import make_synthetic_dataset
from models.checkpoint import CheckpointError
from models.wav2lip import Wav2Lip
from tests.wandb_records import history_keys
from train import describe_student, train

ROOT = Path(__file__).resolve().parents[1]
# A few steps on the generated sample: enough to pass through every stage of the job.
FAST = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=2",
    "data.train_samples=8",
    "data.val_samples=2",
    "callbacks.export.calibration_batches=2",
]


def run_train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_multirun_over_two_slim_factors(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_train("--multirun", "student.slim=0.125,0.25", f"hydra.sweep.dir={sweep}",
                       *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0_slim0.125", "1_slim0.25"]
    student_params = []
    for run in runs:
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "export" / "student_int8.pt2").is_file()
        report = json.loads((run / "export" / "report.json").read_text())
        assert report["psnr_db"]["int8_vs_float_student"] >= 30.0, report["psnr_db"]
        assert report["psnr_db"]["onnx_fp32_vs_float_student"] >= 60.0, report["psnr_db"]
        assert report["psnr_db"]["onnx_int8_vs_float_student"] >= 30.0, report["psnr_db"]
        sizes = report["file_bytes"]
        assert sizes["student_onnx_int8"] < sizes["student_onnx_fp32"]
        student_params.append(report["parameters"]["student"])
        [run_file] = run.glob("wandb/offline-run-*/run-*.wandb")
        keys = history_keys(run_file)
        assert {"train/loss", "train/l1_teacher", "val/loss", "val/l1_teacher"} <= keys, keys
        # As Lightning loads it to resume (ckpt_path=) and eval.py to evaluate it.
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
        assert checkpoint["global_step"] == 4, "last.ckpt is not the newest state"
    assert student_params[0] < student_params[1]
    assert "int8 export:" in result.stdout and "report:" in result.stdout
    assert "last checkpoint:" in result.stdout and "best checkpoint (val/" in result.stdout


def compose_config(output_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", "logger=none",
                                           *FAST, *overrides])


def assert_nothing_written(output_dir: Path) -> None:
    for name in ("checkpoints", "export"):
        assert not (output_dir / name).exists(), f"{name} was written despite the error"


def test_student_name_records_overrides(tmp_path: Path) -> None:
    def name(*overrides: str) -> str:
        return describe_student(compose_config(tmp_path, *overrides).student)

    assert name() == "slim50"
    assert name("student=nota_like") == "nota_like"
    assert name("student.slim=0.25") == "slim50 (slim=0.25)"
    assert name("student=nota_like", "student.head=8", "student.face_residuals=[0,0,0,0,0,1]") \
        == "nota_like (head=8, face_residuals=[0, 0, 0, 0, 0, 1])"


def test_data_folder_without_clips(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose_config(tmp_path / "run", "data=lrs2", f"data.root={empty}")
    with pytest.raises(DataError, match="train.txt does not exist"):
        train(cfg)
    assert_nothing_written(tmp_path / "run")


def test_clip_too_short(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "short", n_clips=2, seconds=0.6, n_val=1)
    cfg = compose_config(tmp_path / "run", "data=lrs2", f"data.root={root}")
    with pytest.raises(DataError, match="too short"):
        train(cfg)
    assert_nothing_written(tmp_path / "run")


def test_checkpoint_that_is_not_wav2lip(tmp_path: Path) -> None:
    foreign = torch.nn.Linear(4, 4)
    torch.save({"state_dict": foreign.state_dict()}, tmp_path / "foreign.pth")
    cfg = compose_config(tmp_path / "run", f"teacher.checkpoint={tmp_path / 'foreign.pth'}")
    with pytest.raises(CheckpointError, match="is not a Wav2Lip checkpoint"):
        train(cfg)
    assert_nothing_written(tmp_path / "run")


def test_unknown_keep_float_layer_fails_before_training(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path / "run", "callbacks.export.keep_float=[no_such_block]")
    message = r"callbacks.export: keep_float paths \['no_such_block'\] match no conv"
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert_nothing_written(tmp_path / "run")


def test_missing_resume_checkpoint(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path / "run", f"ckpt_path={tmp_path / 'nope.ckpt'}")
    with pytest.raises(ValueError, match="nope.ckpt is not a file"):
        train(cfg)
    assert_nothing_written(tmp_path / "run")


def test_cli_truncated_teacher_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "wav2lip.pth"
    torch.save({"state_dict": Wav2Lip().state_dict()}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:1_000_000])
    run_dir = tmp_path / "run"
    result = run_train(f"teacher.checkpoint={path}", f"hydra.run.dir={run_dir}", "logger=none",
                       *FAST, cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint") and "truncated" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = last.removeprefix("error: ")
    printed = (result.stdout + result.stderr).count(message)
    assert printed == 1, f"the error is printed {printed} times"
    assert not run_dir.exists(), f"the failed run left {sorted(run_dir.iterdir())}"


@pytest.mark.slow
def test_real_clips_preprocess_train_export(samples_dir: Path, tmp_path: Path) -> None:
    clips = [samples_dir / "vid_retalking2_844sq_25fps.mp4",
             samples_dir / "vid_retalking4_700sq_30fps.mp4"]
    data_root = tmp_path / "lrs2"
    prep = subprocess.run([sys.executable, "-m", "data.preprocess", "--input", *map(str, clips),
                           "--output", str(data_root)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert prep.returncode == 0, prep.stderr[-2000:]
    listed = [clip for split in ("train", "val")
              for clip in (data_root / f"{split}.txt").read_text().split()]
    assert sorted(listed) == ["vid_retalking2_844sq_25fps", "vid_retalking4_700sq_30fps"]

    run_dir = tmp_path / "run"
    # No best checkpoint at all: last.ckpt must not depend on the monitored one.
    result = run_train("data=lrs2", f"data.root={data_root}", "data.batch_size=2",
                       "data.num_workers=0", f"hydra.run.dir={run_dir}",
                       "callbacks.model_checkpoint.save_top_k=0", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    report = json.loads((run_dir / "export" / "report.json").read_text())
    assert report["psnr_db"]["int8_vs_float_student"] >= 30.0, report["psnr_db"]
    assert report["parameters"]["teacher"] == 36_298_035
