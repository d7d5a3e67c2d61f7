"""S3FD backend with random weights: key format, loading, decoding and frame coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data import preprocess as pp
from data import s3fd
from data.errors import PreprocessError
from data.faces import make_detector


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("s3fd") / "s3fd.pth"
    torch.save(s3fd.S3FD().state_dict(), path)
    return path


def test_key_names_and_shapes_of_the_released_file() -> None:
    state = s3fd.S3FD().state_dict()
    assert state["conv1_1.weight"].shape == (64, 3, 3, 3)
    assert state["conv3_3_norm.weight"].shape == (256,)
    assert state["conv3_3_norm_mbox_conf.weight"].shape == (4, 256, 3, 3)
    assert state["conv4_3_norm_mbox_conf.weight"].shape == (2, 512, 3, 3)
    assert state["fc6.weight"].shape == (1024, 512, 3, 3)
    assert state["fc7_mbox_loc.weight"].shape == (4, 1024, 3, 3)
    assert state["conv7_2_mbox_conf.weight"].shape == (2, 256, 3, 3)
    assert len(state) == 2 * (13 + 2 + 4 + 12) + 3  # convs (weight, bias) + 3 L2Norm scales
    # 22,459,110 float32 values = 85.7 MiB, consistent with the size of s3fd-619a316812.pth.
    assert sum(v.numel() for v in state.values()) == 22_459_110


def test_random_weights_run_on_a_frame(weights: Path) -> None:
    detector = s3fd.S3FDFaceDetector(weights, max_side=128, device="cpu")
    frame = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    faces = detector.detect(frame)
    for x1, y1, x2, y2, score in faces:
        assert 0 <= x1 < x2 <= 300 and 0 <= y1 < y2 <= 200 and 0.5 < score <= 1.0
    outputs = detector.net(torch.zeros(1, 3, 128, 192))
    assert [tuple(p.shape[1:]) for p, _ in outputs] == [
        (32, 48), (16, 24), (8, 12), (4, 6), (2, 3), (1, 2),
    ]


def test_decode_puts_a_box_on_its_anchor_and_scales_back() -> None:
    # One confident cell on the stride-16 map at (x=3, y=2) with zero offsets: the box is its
    # anchor, centre (56, 40), side 64, in detection pixels.
    maps = [(torch.zeros(1, 8, 8), torch.zeros(1, 4, 8, 8)) for _ in range(6)]
    maps[2][0][0, 2, 3] = 0.9
    boxes = s3fd.decode_detections(maps)
    assert boxes.shape == (1, 5)
    np.testing.assert_allclose(boxes[0], [24, 8, 88, 72, 0.9], atol=1e-5)
    # Offsets move the centre by 0.1 * side per unit, and scale the side by exp(0.2 * unit).
    maps[2][1][0, :, 2, 3] = torch.tensor([1.0, 0.0, 0.0, 5.0])
    x1, y1, x2, y2, _ = s3fd.decode_detections(maps)[0]
    assert (x1 + x2) / 2 == pytest.approx(56 + 6.4) and (x2 - x1) == pytest.approx(64)
    assert (y2 - y1) == pytest.approx(64 * np.exp(1.0), rel=1e-5)


def test_detector_reports_full_resolution_boxes(weights: Path, monkeypatch) -> None:
    detector = s3fd.S3FDFaceDetector(weights, max_side=160, device="cpu")
    seen = {}

    def fake_net(batch: torch.Tensor) -> list:
        seen["shape"] = tuple(batch.shape)
        maps = [(torch.zeros(1, 8, 8), torch.zeros(1, 4, 8, 8)) for _ in range(6)]
        maps[2][0][0, 2, 3] = 0.9
        return maps

    monkeypatch.setattr(detector, "net", fake_net)
    faces = detector.detect(np.zeros((1080, 1920, 3), np.uint8))  # detected at 160x90
    assert seen["shape"] == (1, 3, 90, 160)
    scale = 1920 / 160
    assert faces == [(round(24 * scale), round(8 * scale), round(88 * scale), round(72 * scale),
                      pytest.approx(0.9))]


def test_missing_or_foreign_weights_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(PreprocessError, match="not found") as err:
        make_detector("s3fd", tmp_path / "nope.pth")
    assert "\n" not in str(err.value)
    with pytest.raises(PreprocessError, match="needs --s3fd-weights"):
        make_detector("s3fd", None)
    torch.save({"conv1_1.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(PreprocessError, match="not an S3FD state dict"):
        make_detector("s3fd", tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PreprocessError, match="cannot read"):
        make_detector("s3fd", tmp_path / "junk.pth")


def test_cli_s3fd_missing_weights_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "v").mkdir()
    code = pp.main(["--input", str(tmp_path / "v"), "--output", str(tmp_path / "o"),
                    "--detector", "s3fd", "--s3fd-weights", str(tmp_path / "none.pth")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: S3FD weights not found") and "\n" not in err
