"""Parameter and MAC counts against the figures derived from the original Wav2Lip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.complexity import count_macs, count_parameters, main
from models.spec import StudentSpec
from models.wav2lip import Wav2Lip

TEACHER_PARAMS = 36_298_035
# Per frame, convs only (docs: wav2lip-reference.md 1.7, compression-anchors.md 1).
TEACHER_MACS_CONVT_OUTPUT = 6.20e9
TEACHER_MACS_CONVT_INPUT = 3.97e9
# Nota's compressed Wav2Lip (compression-anchors.md 1): 1.26 M parameters, 0.215 G / 0.075 G.
NOTA_PARAMS = 1.26e6
NOTA_MACS_CONVT_OUTPUT = 0.215e9
NOTA_MACS_CONVT_INPUT = 0.075e9
NOTA_SPEC = StudentSpec(slim=0.25, face_residuals=(0,) * 6, audio_residuals=(0,) * 4,
                        decoder_residuals=(0,) * 6)


@pytest.fixture(scope="module")
def teacher_macs() -> dict[str, int]:
    return count_macs(Wav2Lip())


def test_teacher_parameters_and_keys() -> None:
    teacher = Wav2Lip()
    keys = list(teacher.state_dict())
    assert count_parameters(teacher) == TEACHER_PARAMS, count_parameters(teacher)
    assert len(keys) == 352, f"{len(keys)} state-dict keys"
    assert keys[0] == "face_encoder_blocks.0.0.conv_block.0.weight", keys[0]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("macs_convt_output", TEACHER_MACS_CONVT_OUTPUT),
        ("macs_convt_input", TEACHER_MACS_CONVT_INPUT),
    ],
)
def test_teacher_macs(teacher_macs: dict[str, int], key: str, expected: float) -> None:
    got = teacher_macs[key]
    assert abs(got / expected - 1) < 0.01, f"{key}: {got / 1e9:.3f} G, expected {expected / 1e9} G"


def test_conventions_differ_only_in_transposed_convs(teacher_macs: dict[str, int]) -> None:
    diff = teacher_macs["macs_convt_output"] - teacher_macs["macs_convt_input"]
    convt = teacher_macs["macs_convt_only_output"] - teacher_macs["macs_convt_only_input"]
    assert diff == convt > 0, teacher_macs


def test_half_width_student_costs_about_a_quarter(teacher_macs: dict[str, int]) -> None:
    student = count_macs(Wav2Lip(slim=0.5))
    for key in ("macs_convt_output", "macs_convt_input"):
        ratio = student[key] / teacher_macs[key]
        assert 0.22 <= ratio <= 0.30, f"{key}: slim 0.5 / teacher = {ratio:.3f}"


def test_macs_match_hand_count_for_small_net() -> None:
    """One conv and one transposed conv, counted by hand under both conventions."""

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 4, 3, stride=2, padding=1)  # 6x8x8 -> 4x4x4
            self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)

        def forward(self, audio: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
            return self.up(self.conv(face))

    macs = count_macs(Tiny(), img_size=8)
    conv = 4 * 4 * (6 * 4 * 9)  # output positions * cin * cout * k*k
    assert macs["macs_convt_input"] == conv + 4 * 4 * (4 * 2 * 9), macs
    assert macs["macs_convt_output"] == conv + 8 * 8 * (4 * 2 * 9), macs


def test_nota_like_size() -> None:
    nota = Wav2Lip(spec=NOTA_SPEC)
    params, macs = count_parameters(nota), count_macs(nota)
    assert abs(params / NOTA_PARAMS - 1) < 0.02, f"{params:,} parameters"
    for key, expected in (("macs_convt_output", NOTA_MACS_CONVT_OUTPUT),
                          ("macs_convt_input", NOTA_MACS_CONVT_INPUT)):
        assert abs(macs[key] / expected - 1) < 0.02, f"{key}: {macs[key] / 1e9:.4f} G"


def test_cli_prints_both_conventions_for_a_preset(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--preset", "nota_like"])
    lines = capsys.readouterr().out.splitlines()
    teacher = next(line for line in lines if line.startswith("teacher")).split()
    nota = next(line for line in lines if line.startswith("nota_like")).split()
    assert teacher[1:] == ["36,298,035", "1.0x", "6.202", "1.0x", "3.967", "1.0x"], teacher
    assert nota[1:] == ["1,258,143", "28.9x", "0.215", "28.9x", "0.075", "52.9x"], nota
    with pytest.raises(SystemExit):
        main(["--preset", "nota"])
    assert "no student preset 'nota'" in capsys.readouterr().err
