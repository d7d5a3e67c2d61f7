"""Teacher architecture, released-checkpoint loading and its one-line errors."""

from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, load_weights
from models.wav2lip import TAP_NAMES, Wav2Lip


@pytest.fixture(scope="module")
def teacher() -> Wav2Lip:
    torch.manual_seed(0)
    return Wav2Lip().eval()


def released_format(model: Wav2Lip, path: Path, prefix: str = "module.") -> Path:
    """Save like the original training script under torch 1.1: legacy pickle, Adam state, steps."""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters()).state_dict()
    checkpoint = {"state_dict": state, "optimizer": optimizer, "global_step": 3000,
                  "global_epoch": 7}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return path


def test_teacher_matches_released_architecture(teacher: Wav2Lip) -> None:
    state = teacher.state_dict()
    assert sum(p.numel() for p in teacher.parameters()) == 36_298_035
    assert len(state) == 352
    assert list(state)[0] == "face_encoder_blocks.0.0.conv_block.0.weight"
    assert state["face_encoder_blocks.0.0.conv_block.0.weight"].shape == (16, 6, 7, 7)
    assert state["audio_encoder.12.conv_block.0.weight"].shape == (512, 512, 1, 1)
    assert state["face_decoder_blocks.1.0.conv_block.0.weight"].shape == (1024, 512, 3, 3)
    assert state["output_block.0.conv_block.0.weight"].shape == (32, 80, 3, 3)
    assert "face_encoder_blocks.2.3.conv_block.1.running_var" in state


def test_five_d_forward_equals_four_d(teacher: Wav2Lip) -> None:
    torch.manual_seed(1)
    batch, steps = 2, 5
    audio = torch.randn(batch, steps, 1, 80, 16)
    face = torch.rand(batch, 6, steps, 96, 96)
    with torch.no_grad():
        windowed = teacher(audio, face)
        # Time-major rows, as the original stacks its T slices: row t*B + b.
        flat_audio = torch.cat([audio[:, t] for t in range(steps)])
        flat_face = torch.cat([face[:, :, t] for t in range(steps)])
        flat = teacher(flat_audio, flat_face)
    assert windowed.shape == (batch, 3, steps, 96, 96)
    assert flat.shape == (batch * steps, 3, 96, 96)
    for t in range(steps):
        assert torch.equal(windowed[:, :, t], flat[t * batch:(t + 1) * batch])


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_released_format_loads_identically(teacher: Wav2Lip, tmp_path: Path, prefix: str) -> None:
    path = released_format(teacher, tmp_path / "wav2lip.pth", prefix)
    with open(path, "rb") as fh:
        assert fh.read(2) != b"PK", "expected the legacy (non-zip) serialization"
    loaded = load_weights(Wav2Lip().eval(), path)
    audio, face = torch.randn(3, 1, 80, 16), torch.rand(3, 6, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(audio, face), teacher(audio, face))


def test_bare_state_dict_loads(teacher: Wav2Lip, tmp_path: Path) -> None:
    torch.save(teacher.state_dict(), tmp_path / "bare.pt")
    loaded = load_weights(Wav2Lip(), tmp_path / "bare.pt")
    assert torch.equal(loaded.output_block[1].weight, teacher.output_block[1].weight)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_missing_file_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_weights(Wav2Lip(0.25), tmp_path / "nope.pth")
    assert "does not exist" in one_line(err)


def test_truncated_download_error(teacher: Wav2Lip, tmp_path: Path) -> None:
    path = released_format(teacher, tmp_path / "wav2lip.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as err:
        load_weights(Wav2Lip(), path)
    message = one_line(err)
    assert "truncated" in message and "435,807,851" in message and "\x1b" not in message


def test_not_a_wav2lip_checkpoint(tmp_path: Path) -> None:
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as err:
        load_weights(Wav2Lip(0.25), tmp_path / "other.pth")
    assert "is not a Wav2Lip checkpoint" in one_line(err)


def test_text_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "wav2lip.pth"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointError) as err:
        load_weights(Wav2Lip(0.25), path)
    assert "is not a torch file" in one_line(err) and "<html>" in str(err.value)


def test_pickled_objects_are_refused_with_a_reason(tmp_path: Path) -> None:
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "whole.pth")
    with pytest.raises(CheckpointError) as err:
        load_weights(Wav2Lip(0.25), tmp_path / "whole.pth")
    message = one_line(err)
    assert "pickled Python objects" in message and "\x1b" not in message


def test_wrong_slim_factor_names_the_shape(tmp_path: Path) -> None:
    torch.save(Wav2Lip(0.25).state_dict(), tmp_path / "student.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights(Wav2Lip(0.5), tmp_path / "student.pt")
    message = one_line(err)
    assert "wrong shape" in message and "face_encoder_blocks.0.0.conv_block.0.weight" in message


def test_missing_keys_are_reported(teacher: Wav2Lip, tmp_path: Path) -> None:
    state = dict(teacher.state_dict())
    del state["output_block.1.bias"]
    torch.save({"state_dict": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError) as err:
        load_weights(Wav2Lip(), tmp_path / "partial.pth")
    message = one_line(err)
    assert "1 missing keys (first: output_block.1.bias)" in message
    assert "unexpected" not in message


def test_slim_student_is_smaller_and_runs() -> None:
    student = Wav2Lip(slim=0.25).eval()
    params = sum(p.numel() for p in student.parameters())
    assert 36_298_035 / 20 < params < 36_298_035 / 12
    with torch.no_grad():
        out = student(torch.randn(2, 1, 80, 16), torch.rand(2, 6, 96, 96))
    assert out.shape == (2, 3, 96, 96) and 0.0 <= out.min() and out.max() <= 1.0
    with pytest.raises(ValueError, match="slim must be in"):
        Wav2Lip(slim=0.0)


def test_expert_file_given_as_teacher_is_named(tmp_path: Path) -> None:
    from models.syncnet import SyncNet

    torch.save({"state_dict": SyncNet().state_dict()}, tmp_path / "lipsync_expert.pth")
    with pytest.raises(CheckpointError) as err:
        load_weights(Wav2Lip(0.25), tmp_path / "lipsync_expert.pth")
    message = one_line(err)
    assert "is not a Wav2Lip checkpoint: it holds a SyncNet expert" in message
    assert "wav2lip.pth or wav2lip_gan.pth" in message


def test_feature_taps_by_name() -> None:
    student = Wav2Lip(slim=0.0625).eval()
    widths = student.feature_widths()
    assert list(widths) == list(TAP_NAMES)
    # Original widths / 16; sizes: encoder 96 down to the 1 px bottleneck, decoder back up.
    assert [widths[f"face_encoder.{i}"] for i in range(7)] == [1, 2, 4, 8, 16, 32, 32]
    assert widths["audio_encoder"] == 32
    assert [widths[f"face_decoder.{i}"] for i in range(7)] == [32, 32, 32, 24, 16, 8, 4]
    sizes = {**{f"face_encoder.{i}": s for i, s in enumerate((96, 48, 24, 12, 6, 3, 1))},
             "audio_encoder": 1,
             **{f"face_decoder.{i}": s for i, s in enumerate((1, 3, 6, 12, 24, 48, 96))}}
    audio, face = torch.randn(2, 5, 1, 80, 16), torch.rand(2, 6, 5, 96, 96)
    with torch.no_grad():
        out, features = student.forward_with_features(audio, face, TAP_NAMES)
        plain = student(audio, face)
    assert torch.equal(out, plain)
    assert list(features) != [] and set(features) == set(TAP_NAMES)
    for name, feature in features.items():
        # Windows come back flattened time-major: N = B * T.
        assert feature.shape == (10, widths[name], sizes[name], sizes[name]), name
    with pytest.raises(ValueError, match="unknown feature taps \\['face_decoder.7'\\]"):
        student.forward_with_features(audio, face, ["face_decoder.7"])
