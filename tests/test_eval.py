"""eval.py end to end on the generated sample: a released-format teacher, two students, an int8
program and a hand-made fixed-batch ONNX model in one table; one-line errors for bad input; and a
student read from a Lightning checkpoint."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch.utils.data import default_collate

from compress.complexity import count_macs, count_parameters
from compress.eval_models import load_generator
from compress.fold import fold_batchnorm
from compress.quantize import quantize_int8, save_program
from data.dataset import WindowDataset
from data.synthetic import make_synthetic_dataset
from eval import main
from models.student import build_student, save_student
from models.syncnet import SyncNet
from models.wav2lip import Wav2Lip

TEACHER_PARAMETERS = 36_298_035
ONNX_BATCH = 3  # fixed batch: 5 frames per window run as 3 + 2 padded
# No residual layers: half the convolutions, so the int8 program exports and loads faster.
TINY = {"slim": 0.125, "face_residuals": [0] * 6, "audio_residuals": [0] * 4,
        "decoder_residuals": [0] * 6}


def released(model: torch.nn.Module, path: Path) -> Path:
    """Save as the original scripts did under torch 1.1: legacy pickle, ``module.`` keys."""
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 1}, path,
               _use_new_zipfile_serialization=False)
    return path


def reference_frame_onnx(path: Path) -> Path:
    """A fixed-batch ONNX 'generator' that returns the reference frame: face channels 3-5."""
    mel = helper.make_tensor_value_info("mel", TensorProto.FLOAT, [ONNX_BATCH, 1, 80, 16])
    face = helper.make_tensor_value_info("face", TensorProto.FLOAT, [ONNX_BATCH, 6, 96, 96])
    out = helper.make_tensor_value_info("frames", TensorProto.FLOAT, [ONNX_BATCH, 3, 96, 96])
    bounds = [helper.make_tensor(n, TensorProto.INT64, [1], [v])
              for n, v in (("starts", 3), ("ends", 6), ("axes", 1))]
    node = helper.make_node("Slice", ["face", "starts", "ends", "axes"], ["frames"])
    graph = helper.make_graph([node], "reference", [mel, face], [out], initializer=bounds)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core machine a second one mostly waits at barriers."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("eval")
    root = make_synthetic_dataset(base / "data", n_clips=2, n_val=1)
    torch.manual_seed(0)
    (base / "a").mkdir()
    (base / "b").mkdir()
    tiny = build_student(name="tiny", **TINY).eval()
    batch = default_collate([WindowDataset(root, "train", 2, deterministic=True)[i]
                             for i in range(2)])
    calibration = [(batch["mel"].flatten(0, 1), batch["face"].transpose(1, 2).flatten(0, 1))]
    program = base / "a" / "student_int8.pt2"
    save_program(quantize_int8(fold_batchnorm(tiny), calibration), program)
    return {
        "root": root,
        "teacher": released(Wav2Lip(), base / "teacher.pth"),
        "tiny": save_student(tiny, base / "a" / "student.pt"),
        "tinier": save_student(build_student(name="tinier", slim=0.0625), base / "b" /
                               "student.pt"),
        "program": program,
        "onnx": reference_frame_onnx(base / "reference.onnx"),
        "syncnet": released(SyncNet(), base / "syncnet.pth"),
        "out": base / "out",
    }


def test_table_has_a_row_per_model(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out_json, out_md = files["out"] / "table.json", files["out"] / "table.md"
    code = main([
        str(files["root"]), "--split", "val", "--teacher", str(files["teacher"]),
        "--student", str(files["tiny"]), "--student", str(files["tinier"]),
        "--program", str(files["program"]), "--program", str(files["onnx"]),
        "--syncnet", str(files["syncnet"]), "--sync-offsets", "1",
        "--samples", "1", "--batch-size", "1", "--fps-frames", "2", "--fps-runs", "1",
        "--threads", "1", "--out", str(out_json), "--out", str(out_md),
    ])
    printed = capsys.readouterr().out
    assert code == 0
    table = json.loads(out_json.read_text())
    rows = {row["model"]: row for row in table["rows"]}
    assert list(rows) == ["teacher.pth", "a/student.pt", "b/student.pt", "student_int8.pt2",
                          "reference.onnx", "ground truth"]
    assert [r["type"] for r in rows.values()] == [
        "teacher", "student tiny", "student tinier", "pt2 int8", "onnx fp32", "real frames"]
    assert table["meta"]["frames"] == 5 and table["meta"]["threads"] == 1

    teacher = rows["teacher.pth"]
    assert teacher["parameters"] == TEACHER_PARAMETERS
    assert teacher["gmacs_convt_output"] == pytest.approx(6.202, abs=5e-4)
    assert teacher["gmacs_convt_input"] == pytest.approx(3.967, abs=5e-4)
    # The teacher against itself: an exact match, written as inf.
    assert teacher["psnr_lower_teacher"] == "inf" and teacher["psnr_full_teacher"] == "inf"
    assert teacher["ssim_lower_teacher"] == pytest.approx(1.0, abs=1e-5)  # float32 SSIM

    tiny = build_student(name="tiny", **TINY)
    tiny_macs = count_macs(tiny)
    assert rows["a/student.pt"]["parameters"] == count_parameters(tiny)
    # The int8 program: conv weights and biases with BatchNorm folded, the same conv MACs.
    int8 = rows["student_int8.pt2"]
    assert int8["parameters"] == count_parameters(fold_batchnorm(tiny.eval()))
    assert int8["gmacs_convt_output"] == tiny_macs["macs_convt_output"] / 1e9
    assert int8["gmacs_convt_input"] == tiny_macs["macs_convt_input"] / 1e9
    assert abs(int8["psnr_lower_teacher"] - rows["a/student.pt"]["psnr_lower_teacher"]) < 1.0
    assert rows["reference.onnx"]["parameters"] is None

    for name, row in rows.items():
        if name == "ground truth":
            assert row["psnr_lower_gt"] is None and row["fps"] is None
        else:
            values = [row[k] for k in ("psnr_lower_gt", "psnr_full_gt", "ssim_lower_gt", "fps")]
            assert all(math.isfinite(v) for v in values), (name, values)
            assert 0.0 < row["ssim_lower_gt"] <= 1.0 and row["fps"] > 0
        if name not in ("teacher.pth", "ground truth"):
            assert math.isfinite(row["psnr_lower_teacher"]), name
            assert row["psnr_lower_teacher"] < 100 and row["ssim_lower_teacher"] < 1.0
        assert 0.0 <= row["lse_d"] <= math.sqrt(2) and row["lse_c"] >= 0.0, name
        assert row["sync_offset"] in (-1, 0, 1), name

    markdown = out_md.read_text()
    assert printed.startswith(markdown)
    teacher_cells = "| teacher.pth | teacher | 36,298,035 | 6.202 | 3.967 | inf | 1.0000 | inf |"
    assert teacher_cells in markdown
    assert "| reference.onnx | onnx fp32 | n/a | n/a | n/a |" in markdown


@pytest.mark.parametrize("args, message", [
    (["--teacher", "{teacher}"], "has no 'test' split (test.txt is missing); pass --split "
                                 "train or val"),
    (["--split", "val", "--student", "{root}/missing.pt"], "missing.pt does not exist"),
    (["--split", "val", "--program", "{tiny}"], "is not an exported program: give a .pt2"),
    (["--split", "val", "--student", "{program}"], "is an exported program; pass it with "
                                                   "--program"),
    (["--split", "val"], "no model to evaluate"),
    (["--split", "val", "--student", "{tiny}", "--samples", "0"], "samples must be an int >= 1"),
])
def test_bad_input_is_one_line(
    files: dict[str, Path], capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    code = main([str(files["root"]), *(a.format(**files) for a in args)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_lightning_checkpoint_loads_its_student(tmp_path: Path, one_thread: None) -> None:
    torch.manual_seed(1)
    student = build_student(name="tiny", **TINY).eval()
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    state["adapters.3.weight"] = torch.zeros(1)  # training-only weights beside the student
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "student_spec": student.spec.to_dict()}, path)
    loaded, kind = load_generator(path)
    assert kind == "student tiny (ckpt)" and not loaded.training
    mel, face = torch.rand(2, 1, 80, 16), torch.rand(2, 6, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(mel, face), student(mel, face))
