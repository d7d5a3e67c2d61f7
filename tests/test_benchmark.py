"""The benchmark writes complete results on a small run; it never asserts a speed."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import benchmark as cli
from compress import benchmark
from compress.benchmark import BenchmarkConfig, run_benchmark

BATCHES = (1, 2)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    folder = tmp_path_factory.mktemp("bench")
    failing = pytest.MonkeyPatch()
    real_prepare = benchmark._prepare

    def prepare(backend: str, *args: Any, **kwargs: Any) -> Any:
        # Stands for a backend that cannot handle a preset: it must become a table cell.
        if backend == "compile_int8":
            raise RuntimeError("no int8 kernel here\nsecond line of the traceback text")
        return real_prepare(backend, *args, **kwargs)

    failing.setattr(benchmark, "_prepare", prepare)
    cfg = BenchmarkConfig(presets=("micro",), backends=("eager_fp32", "ort_fp32", "compile_int8"),
                          batches=BATCHES, threads=1, budget_s=0.0, min_repeats=2, max_repeats=2,
                          output_dir=folder, chunk=1)
    threads = torch.get_num_threads()
    try:
        result = run_benchmark(cfg)
    finally:
        failing.undo()
    # Left at 1, later tests in this process would compute with other kernels than a fresh one.
    assert torch.get_num_threads() == threads
    return result, folder


def test_outputs_are_written(report: tuple[dict[str, Any], Path]) -> None:
    result, folder = report
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["artifacts", "results.json", "results.md", "throughput.png"], names
    assert json.loads((folder / "results.json").read_text())["teacher_fps"].keys() == {"1", "2"}
    assert (folder / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = sorted(p.name for p in (folder / "artifacts").iterdir())
    assert artifacts == ["micro_fp32.onnx", "micro_fp32.pt", "teacher_fp32.pt",
                         "width1_fp32.onnx", "width1_fp32.pt"], artifacts
    assert result["machine"]["threads"] == 1


def test_measurements_are_finite_and_ratios_from_this_run(
    report: tuple[dict[str, Any], Path],
) -> None:
    result, _ = report
    rows = result["measurements"]
    measured = [m for m in rows if m["backend"] != "compile_int8"]
    assert {(m["model"], m["backend"], m["batch"]) for m in measured} == {
        (model, backend, b)
        for model, backend in [("teacher", "eager_fp32"), ("micro", "eager_fp32"),
                               ("micro", "ort_fp32"), ("width1", "eager_fp32"),
                               ("width1", "ort_fp32")]
        for b in BATCHES
    }
    teacher = {m["batch"]: m["fps"] for m in rows if m["model"] == "teacher"}
    for m in measured:
        assert m["error"] is None, m
        assert math.isfinite(m["fps"]) and m["fps"] > 0, m
        assert len(m["seconds"]) == 2, m
        assert m["fps"] == pytest.approx(m["batch"] / statistics.median(m["seconds"]))
        assert m["ratio_to_teacher"] == pytest.approx(m["fps"] / teacher[m["batch"]])
    micro = result["models"]["micro"]
    assert micro["parameters"] == 1_200_375
    assert micro["macs_convt_output"] > micro["macs_convt_input"] > 0
    assert set(micro["artifact_bytes"]) == {"eager_fp32", "ort_fp32"}


def test_width1_bound_has_one_channel_per_layer(report: tuple[dict[str, Any], Path]) -> None:
    result, folder = report
    model = benchmark._width1_bound()
    convs = [m for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    # Every conv but the RGB output has one channel; the stored file holds this network.
    assert sorted(c.out_channels for c in convs) == [1] * (len(convs) - 1) + [3]
    stored = torch.load(folder / "artifacts" / "width1_fp32.pt", weights_only=True)
    assert sum(v.numel() for k, v in stored.items() if k.endswith("weight")) == sum(
        c.weight.numel() for c in convs)
    bound, micro = result["models"]["width1"], result["models"]["micro"]
    assert bound["macs_convt_input"] < micro["macs_convt_input"] / 10
    assert "width1: one channel per layer" in (folder / "results.md").read_text()


@pytest.mark.parametrize("numpy", [False, True])
def test_run_in_chunks_equals_one_call(numpy: bool) -> None:
    audio, face = benchmark.image_like(7, torch.Generator().manual_seed(0))
    model = benchmark.load_preset("micro").eval()
    calls: list[int] = []

    def forward(a: Any, f: Any) -> Any:
        calls.append(len(f))
        if numpy:
            return model(torch.from_numpy(a), torch.from_numpy(f)).numpy()
        return model(a, f)

    inputs = (audio.numpy(), face.numpy()) if numpy else (audio, face)
    concatenate = np.concatenate if numpy else torch.cat
    with torch.no_grad():
        whole = benchmark.run_in_chunks(forward, *inputs, None, concatenate)
        chunked = benchmark.run_in_chunks(forward, *inputs, 3, concatenate)
    assert calls == [7, 3, 3, 1]
    # Same frames in the same order; eval-mode BatchNorm makes frames independent of the batch.
    torch.testing.assert_close(torch.as_tensor(chunked), torch.as_tensor(whole),
                               rtol=1e-5, atol=1e-6)


class _RecordsBatches(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, audio: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(face))
        return face


def test_students_run_in_chunks_and_the_teacher_in_one_call(
    report: tuple[dict[str, Any], Path], tmp_path: Path,
) -> None:
    result, folder = report
    assert result["config"]["chunk"] == 1
    assert "Students run a batch in calls of at most 1 frames" in (
        folder / "results.md").read_text()
    cfg = BenchmarkConfig(presets=("micro",), chunk=2, output_dir=tmp_path)
    for stem, expected in (("teacher", [5]), ("micro", [2, 2, 1])):
        model = _RecordsBatches()
        runner = benchmark._prepare(benchmark.Backend.EAGER_FP32, model, tmp_path, stem, cfg, 1)
        assert runner.run(5).shape[0] == 5
        assert model.batches == expected, stem


def test_failed_backend_is_a_table_cell(report: tuple[dict[str, Any], Path]) -> None:
    result, folder = report
    failed = [m for m in result["measurements"]
              if m["backend"] == "compile_int8" and m["model"] == "micro"]
    assert [m["batch"] for m in failed] == list(BATCHES)
    assert all(m["fps"] is None for m in failed)
    assert failed[0]["error"] == "RuntimeError: no int8 kernel here"
    table = (folder / "results.md").read_text()
    row = next(line for line in table.splitlines() if "compile_int8" in line)
    assert "failed: RuntimeError: no int8 kernel here" in row
    assert "| teacher | eager_fp32 | 36,298,035 |" in table


def test_command_line_rejects_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--presets", "no_such_preset"])
    assert exit_info.value.code == 2
    assert "no student preset ['no_such_preset']" in capsys.readouterr().err


def test_command_line_rejects_negative_chunk(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--chunk", "-3", "--output-dir", str(tmp_path / "bench")])
    assert exit_info.value.code == 2
    assert "chunk -3 must be a positive number of frames" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()
