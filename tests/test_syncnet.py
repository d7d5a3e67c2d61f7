"""Expert SyncNet and visual-quality discriminator: architecture, helpers, losses and loaders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from models.checkpoint import CheckpointError
from models.discriminator import QualityDiscriminator, load_discriminator
from models.syncnet import SyncNet, cosine_sync_loss, load_syncnet, sync_input
from models.wav2lip import Wav2Lip


@pytest.fixture(scope="module")
def syncnet() -> SyncNet:
    torch.manual_seed(0)
    return SyncNet().eval()


@pytest.fixture(scope="module")
def disc() -> QualityDiscriminator:
    torch.manual_seed(0)
    return QualityDiscriminator().eval()


def released_format(model: nn.Module, path: Path, prefix: str = "module.") -> Path:
    """Save like the original training scripts under torch 1.1: legacy pickle, Adam state."""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters()).state_dict()
    checkpoint = {"state_dict": state, "optimizer": optimizer, "global_step": 1,
                  "global_epoch": 1}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    with open(path, "rb") as fh:
        assert fh.read(2) != b"PK", "expected the legacy (non-zip) serialization"
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_syncnet_matches_released_architecture(syncnet: SyncNet) -> None:
    state = syncnet.state_dict()
    assert n_params(syncnet) == 16_435_072
    assert len(state) == (17 + 14) * 7  # conv w/b + BN w/b/mean/var/count per wrapper
    assert list(state)[0] == "face_encoder.0.conv_block.0.weight"
    assert state["face_encoder.0.conv_block.0.weight"].shape == (32, 15, 7, 7)
    assert state["face_encoder.1.conv_block.0.weight"].shape == (64, 32, 5, 5)
    assert state["face_encoder.16.conv_block.0.weight"].shape == (512, 512, 1, 1)
    assert state["audio_encoder.11.conv_block.0.weight"].shape == (256, 256, 3, 3)
    assert state["audio_encoder.13.conv_block.0.weight"].shape == (512, 512, 1, 1)
    assert "audio_encoder.13.conv_block.1.num_batches_tracked" in state
    assert syncnet.face_encoder[1].conv_block[0].stride == (1, 2)
    assert syncnet.audio_encoder[9].conv_block[0].stride == (3, 2)


def test_discriminator_matches_released_architecture(disc: QualityDiscriminator) -> None:
    state = disc.state_dict()
    assert n_params(disc) == 14_113_793
    assert len(state) == 13 * 2 + 2  # no BatchNorm: conv weight and bias only
    assert state["face_encoder_blocks.0.0.conv_block.0.weight"].shape == (32, 3, 7, 7)
    assert state["face_encoder_blocks.1.0.conv_block.0.weight"].shape == (64, 32, 5, 5)
    assert state["face_encoder_blocks.6.1.conv_block.0.weight"].shape == (512, 512, 1, 1)
    assert state["binary_pred.0.weight"].shape == (1, 512, 1, 1)
    assert state["binary_pred.0.bias"].shape == (1,)
    assert disc.face_encoder_blocks[1][0].act.negative_slope == 0.01


def test_syncnet_outputs_unit_norm_embeddings(syncnet: SyncNet) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        audio_emb, face_emb = syncnet(torch.randn(3, 1, 80, 16), torch.rand(3, 15, 48, 96))
    for emb in (audio_emb, face_emb):
        assert emb.shape == (3, 512)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
        assert emb.min() >= 0, "embeddings leave a ReLU, so similarities lie in [0, 1]"
    with pytest.raises(ValueError, match="sync_input"):
        syncnet(torch.randn(2, 1, 80, 16), torch.rand(2, 3, 5, 96, 96))


def test_sync_input_stacks_lower_halves_frame_major() -> None:
    frames = torch.rand(2, 3, 5, 96, 96)
    stacked = sync_input(frames)
    assert stacked.shape == (2, 15, 48, 96)
    # The original concatenates frame t's BGR planes as channels 3t..3t+2.
    expected = torch.cat([frames[:, :, t, 48:] for t in range(5)], dim=1)
    assert torch.equal(stacked, expected)
    assert torch.equal(stacked[:, 3 * 2 + 1], frames[:, 1, 2, 48:])
    with pytest.raises(ValueError, match=r"\(B, 3, 5, H, W\)"):
        sync_input(torch.rand(2, 3, 4, 96, 96))


def test_cosine_sync_loss_hand_computed() -> None:
    audio = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    face = torch.tensor([[4.0, 3.0], [2.0, 0.0]])
    # cos = 24/25 and 1, so the loss is mean(-ln 0.96, -ln 1).
    expected = -math.log(0.96) / 2
    assert cosine_sync_loss(audio, face).item() == pytest.approx(expected, rel=1e-6)
    # A zero embedding stays finite (clamped at 1e-7), instead of BCE's saturated 100.
    zero = cosine_sync_loss(torch.zeros(1, 2), torch.ones(1, 2))
    assert zero.item() == pytest.approx(-math.log(1e-7), rel=1e-4)


def test_sync_loss_trains_the_generator_not_the_expert(syncnet: SyncNet, tmp_path: Path) -> None:
    expert = load_syncnet(released_format(syncnet, tmp_path / "lipsync_expert.pth"))
    assert not expert.training and not any(p.requires_grad for p in expert.parameters())
    window = torch.rand(2, 3, 5, 96, 96, requires_grad=True)
    loss = cosine_sync_loss(*expert(torch.randn(2, 1, 80, 16), sync_input(window)))
    loss.backward()
    assert window.grad is not None and window.grad[:, :, :, 48:].abs().sum() > 0
    assert window.grad[:, :, :, :48].abs().sum() == 0, "the expert sees lower halves only"


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_syncnet_released_format_loads_identically(
    syncnet: SyncNet, tmp_path: Path, prefix: str
) -> None:
    loaded = load_syncnet(released_format(syncnet, tmp_path / "lipsync_expert.pth", prefix))
    audio, face = torch.randn(2, 1, 80, 16), torch.rand(2, 15, 48, 96)
    with torch.no_grad():
        for got, want in zip(loaded(audio, face), syncnet(audio, face)):
            assert torch.equal(got, want)


def test_discriminator_released_format_loads_identically(
    disc: QualityDiscriminator, tmp_path: Path
) -> None:
    loaded = load_discriminator(released_format(disc, tmp_path / "visual_quality_disc.pth"))
    assert loaded.training, "the GAN variant keeps training the discriminator"
    faces = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(faces), disc(faces))


def test_discriminator_windows_are_time_major_lower_halves(disc: QualityDiscriminator) -> None:
    torch.manual_seed(2)
    batch, steps = 2, 3
    window = torch.rand(batch, 3, steps, 96, 96)
    with torch.no_grad():
        pred = disc(window)
        flat = disc(torch.cat([window[:, :, t] for t in range(steps)]))
        window[:, :, :, :48] = 0.0  # the upper half is never seen
        masked = disc(window)
    assert pred.shape == (batch * steps, 1)
    assert ((pred > 0) & (pred < 1)).all()
    torch.testing.assert_close(pred, flat)
    assert torch.equal(pred, masked)


def test_discriminator_losses_are_bce(disc: QualityDiscriminator) -> None:
    real, fake = torch.rand(2, 3, 96, 96), torch.rand(2, 3, 96, 96, requires_grad=True)
    with torch.no_grad():
        p_real, p_fake = disc(real), disc(fake)
    perceptual = disc.perceptual_loss(fake)
    torch.testing.assert_close(perceptual, -p_fake.log().mean())
    torch.testing.assert_close(disc.discriminator_loss(real, fake),
                               -p_real.log().mean() - (1 - p_fake).log().mean())
    perceptual.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_generator_checkpoint_is_not_a_syncnet(tmp_path: Path) -> None:
    path = released_format(Wav2Lip(0.25), tmp_path / "wav2lip.pth")
    with pytest.raises(CheckpointError) as err:
        load_syncnet(path)
    message = one_line(err)
    assert "is not a SyncNet checkpoint: it holds a Wav2Lip generator" in message
    assert "lipsync_expert.pth" in message
    with pytest.raises(CheckpointError) as err:
        load_discriminator(path)
    assert "is not a visual-quality discriminator checkpoint" in one_line(err)


def test_expert_and_discriminator_files_are_not_swapped(
    syncnet: SyncNet, disc: QualityDiscriminator, tmp_path: Path
) -> None:
    expert_path = tmp_path / "lipsync_expert.pth"
    torch.save(syncnet.state_dict(), expert_path)
    with pytest.raises(CheckpointError) as err:
        load_discriminator(expert_path)
    assert "it holds a SyncNet" in one_line(err)
    disc_path = tmp_path / "visual_quality_disc.pth"
    torch.save(disc.state_dict(), disc_path)
    with pytest.raises(CheckpointError) as err:
        load_syncnet(disc_path)
    assert "it holds a visual-quality discriminator" in one_line(err)


def test_damaged_syncnet_names_the_problem(syncnet: SyncNet, tmp_path: Path) -> None:
    state = dict(syncnet.state_dict())
    state["audio_encoder.0.conv_block.0.weight"] = torch.zeros(32, 2, 3, 3)
    torch.save({"state_dict": state}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as err:
        load_syncnet(tmp_path / "odd.pth")
    message = one_line(err)
    assert "wrong shape" in message and "audio_encoder.0.conv_block.0.weight" in message
