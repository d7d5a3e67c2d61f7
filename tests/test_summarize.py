"""experiments/summarize.py: curves across resumed versions, seed grouping, the table and plot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("summarize", ROOT / "experiments" / "summarize.py")
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)


def write_log(run: Path, version: int, rows: list[tuple[int, float | str]]) -> None:
    folder = run / "csv" / f"version_{version}"
    folder.mkdir(parents=True)
    lines = ["epoch,step,train/loss,val/psnr_teacher"]
    lines += [f"0,{step},0.5,{value}" for step, value in rows]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_resumed_versions_join_and_seeds_group(tmp_path: Path) -> None:
    # Run a_s0 was resumed: version 1 continues (and overrides step 100 of) version 0.
    write_log(tmp_path / "a_s0", 0, [(50, 18.0), (100, 19.0)])
    write_log(tmp_path / "a_s0", 1, [(100, 19.5), (150, 20.0)])
    write_log(tmp_path / "a_s1", 0, [(50, 17.0), (150, 19.0), (100, "")])
    write_log(tmp_path / "b_s0", 0, [(150, 21.0)])
    (tmp_path / "data").mkdir()  # not a run: no csv/

    curve = summarize.read_curves(tmp_path / "a_s0")["val/psnr_teacher"]
    assert curve == [(50, 18.0), (100, 19.5), (150, 20.0)]
    groups = summarize.group_runs(tmp_path, r"(.*)_s\d+$")
    assert {k: [p.name for p in v] for k, v in groups.items()} == {
        "a": ["a_s0", "a_s1"], "b": ["b_s0"]}

    rows = summarize.summarize(groups, ("val/psnr_teacher",))
    assert rows[0]["val/psnr_teacher"] == [20.0, 19.0]
    table = summarize.format_table(rows, ("val/psnr_teacher",))
    assert "| a | 2 | 19.50 ± 0.50 (20.00, 19.00) |" in table
    assert "| b | 1 | 21.00 ± 0.00 (21.00) |" in table


def test_cli_writes_table_and_plot(tmp_path: Path) -> None:
    write_log(tmp_path / "runs" / "a_s0", 0, [(50, 18.0), (100, 19.0)])
    out = tmp_path / "summary"
    assert summarize.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert "19.00 ± 0.00" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
