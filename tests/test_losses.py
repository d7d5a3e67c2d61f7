"""Each loss term of the recipe against values computed by hand on tiny tensors."""

import math

import pytest
import torch
from torch import nn

from compress.metrics import as_images, lower_half, psnr_db, ssim_index
from models.losses import (
    feature_distillation_loss,
    mouth_weighted_l1,
    ssim_loss,
    sync_loss,
    weighted_sum,
)
from models.syncnet import cosine_sync_loss


def row_ramp() -> torch.Tensor:
    """A (1, 3, 1, 4, 4) window whose rows hold 0.1, 0.2, 0.3, 0.4 in every channel."""
    rows = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 1, 1, 4, 1)
    return rows.expand(1, 3, 1, 4, 4).clone()


@pytest.mark.parametrize(("mouth_weight", "expected"), [
    (0.0, (0.1 + 0.2 + 0.3 + 0.4) / 4),
    # Rows 2 and 3 (the lower half) count twice: (0.1 + 0.2 + 2 * 0.3 + 2 * 0.4) / 6.
    (1.0, 1.7 / 6),
    # Four times: (0.1 + 0.2 + 4 * 0.3 + 4 * 0.4) / 10.
    (3.0, 3.1 / 10),
])
def test_mouth_weighted_l1(mouth_weight: float, expected: float) -> None:
    target = row_ramp()
    pred = torch.zeros_like(target)
    assert mouth_weighted_l1(pred, target, mouth_weight).item() == pytest.approx(expected)
    # Frames (N, C, H, W) give the same; a uniform error keeps its value whatever the weight.
    assert mouth_weighted_l1(pred[:, :, 0], target[:, :, 0], mouth_weight).item() == (
        pytest.approx(expected))
    assert mouth_weighted_l1(pred, pred + 0.25, mouth_weight).item() == pytest.approx(0.25)


def test_feature_distillation_loss_with_fixed_adapters() -> None:
    mix = nn.Conv2d(2, 1, kernel_size=1)
    scale = nn.Conv2d(1, 1, kernel_size=1, bias=False)
    with torch.no_grad():
        mix.weight.copy_(torch.tensor([1.0, 2.0]).view(1, 2, 1, 1))
        mix.bias.fill_(0.5)
        scale.weight.fill_(2.0)
    student = {
        # Adapted: 1 * [1, 2] + 2 * [3, -1] + 0.5 = [7.5, 0.5]; teacher [7, 1]: MSE 0.25.
        "face_decoder.4": torch.tensor([[1.0, 2.0], [3.0, -1.0]]).view(1, 2, 1, 2),
        # Adapted: 2 * [1, 2, 3, 4]; teacher [2, 4, 6, 10]: errors 0, 0, 0, 2, MSE 1.
        "audio_encoder": torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2),
        "face_encoder.1": torch.ones(1, 1, 1, 1),  # not adapted, so not compared
    }
    teacher = {
        "face_decoder.4": torch.tensor([7.0, 1.0]).view(1, 1, 1, 2),
        "audio_encoder": torch.tensor([2.0, 4.0, 6.0, 10.0]).view(1, 1, 2, 2),
        "face_encoder.1": torch.zeros(1, 1, 1, 1),
    }
    adapters = {"face_decoder.4": mix, "audio_encoder": scale}
    loss = feature_distillation_loss(student, teacher, adapters)
    assert loss.item() == pytest.approx((0.25 + 1.0) / 2)
    loss.backward()
    assert mix.weight.grad is not None and scale.weight.grad is not None
    with pytest.raises(ValueError, match="at least one tap"):
        feature_distillation_loss(student, teacher, {})


class FixedSync(nn.Module):
    """A stand-in expert: audio [1, 0]; face [m, 1 - m] with m the mean of its face input."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def forward(
        self, audio: torch.Tensor, face: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append((tuple(audio.shape), tuple(face.shape)))
        mean = face.mean(dim=(1, 2, 3))
        audio_emb = torch.tensor([[1.0, 0.0]]).expand(len(face), 2)
        face_emb = nn.functional.normalize(torch.stack([mean, 1 - mean], dim=1), dim=1)
        return audio_emb, face_emb


def test_sync_loss_is_bce_of_the_cosine_on_lower_halves() -> None:
    # Upper halves 0, lower halves 0.5: the expert must see only the lower halves, so m = 0.5,
    # face [0.5, 0.5] / |.|, cosine 1 / sqrt(2), BCE against 1 = -log(1 / sqrt(2)) = ln(2) / 2.
    frames = torch.zeros(2, 3, 5, 8, 6)
    frames[..., 4:, :] = 0.5
    expert = FixedSync()
    loss = sync_loss(expert, frames, torch.zeros(2, 1, 80, 16))
    assert loss.item() == pytest.approx(math.log(2) / 2)
    assert expert.seen == [((2, 1, 80, 16), (2, 15, 4, 6))]


def test_cosine_sync_loss_from_a_hand_picked_cosine() -> None:
    # Unit vectors at cosine 0.6 and 1.0: the batch mean of -log is (-log 0.6 - log 1) / 2.
    audio = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    face = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    assert cosine_sync_loss(audio, face).item() == pytest.approx(-math.log(0.6) / 2)


def test_ssim_loss() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 5, 16, 16)
    assert ssim_loss(images, images).item() == pytest.approx(0.0, abs=1e-6)
    # Constant images have no variance, so SSIM is the luminance term alone:
    # (2 a b + C1) / (a^2 + b^2 + C1), C1 = (0.01 * data range)^2.
    a, b, c1 = 0.2, 0.6, 0.01**2
    expected = 1 - (2 * a * b + c1) / (a**2 + b**2 + c1)
    loss = ssim_loss(torch.full((1, 3, 2, 16, 16), a), torch.full((1, 3, 2, 16, 16), b))
    # float32 leaves E[x^2] - E[x]^2 a little above 0, hence the tolerance.
    assert loss.item() == pytest.approx(expected, abs=2e-4)


def test_weighted_sum() -> None:
    terms = {"l1_gt": torch.tensor(2.0), "sync": torch.tensor(3.0)}
    assert weighted_sum(terms, {"l1_gt": 0.5, "sync": 2.0, "ssim": 9.0}).item() == 7.0
    with pytest.raises(KeyError, match="sync"):
        weighted_sum(terms, {"l1_gt": 1.0})


def test_lower_half_metrics() -> None:
    clean = torch.zeros(1, 3, 5, 96, 96)
    noisy = clean.clone()
    noisy[..., 48:, :] = 0.1
    assert lower_half(noisy).shape == (1, 3, 5, 48, 96)
    assert torch.all(lower_half(noisy) == 0.1)
    # MSE 0.01 in the lower half: 10 log10(1 / 0.01) = 20 dB; the full frame has half that MSE.
    assert psnr_db(lower_half(noisy), lower_half(clean)).item() == pytest.approx(20.0)
    assert psnr_db(noisy, clean).item() == pytest.approx(10 * math.log10(200))
    # Time-major frames, as the generator flattens windows: row t*B + b.
    window = torch.arange(10.0).view(2, 1, 5, 1, 1).expand(2, 3, 5, 16, 16) / 10
    assert (10 * as_images(window)[:, 0, 0, 0]).round().tolist() == [0, 5, 1, 6, 2, 7, 3, 8, 4, 9]
    # Flat frames: float32 rounding of the variances, relative to C2 = 9e-4, costs up to ~1e-3.
    same = ssim_index(lower_half(window), lower_half(window))
    assert same.item() == pytest.approx(1.0, abs=1e-3)
