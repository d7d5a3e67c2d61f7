"""BatchNorm folding: the folded student computes what the unfolded one computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.fold import fold_batchnorm
from models.wav2lip import Wav2Lip


def _randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.25)
                bn.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=generator) * 0.2)


def _inputs(
    batch: int, generator: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    mel = torch.randn(batch, 1, 80, 16, generator=generator, dtype=dtype)
    face = torch.rand(batch, 6, 96, 96, generator=generator, dtype=dtype)
    return mel, face


# Float64 isolates the folding arithmetic; float32 is what gets exported and deployed.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("slim", [0.25, 0.5])
def test_folded_student_matches_unfolded(slim: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = Wav2Lip(slim=slim)
    _randomise_batchnorm(model, generator)
    model = model.to(dtype).eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_convt = sum(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    folded = fold_batchnorm(model)

    assert n_bn == 50, f"Wav2Lip has 50 BatchNorm layers, found {n_bn}"
    assert n_convt == 6, f"Wav2Lip has 6 transposed convs, found {n_convt}"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), "BatchNorm left"
    n_folded = sum(isinstance(m, nn.Identity) for m in folded.modules())
    assert n_folded == n_bn, f"folded {n_folded} layers, expected {n_bn}"
    assert not folded.training, "the folded copy must be in eval mode"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), (
        "fold_batchnorm modified its input"
    )

    mel, face = _inputs(3, generator, dtype)
    with torch.no_grad():
        reference = model(mel, face)
        out = folded(mel, face)
    # Guard against a trivial pass: saturated or constant outputs would match regardless.
    assert reference.std() > 0.01, f"reference output nearly constant (std {reference.std():.2e})"
    err = (out - reference).abs().max().item()
    assert err < 1e-5, f"folded vs unfolded max abs error {err:.3e} (slim {slim}, {dtype})"


def test_fold_transposed_conv_scales_output_channels() -> None:
    """Grouped transposed conv: weights are (in, out / groups, kH, kW), scaled along dim 1."""
    generator = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    for groups in (1, 2):
        model = nn.Sequential(
            nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups),
            nn.BatchNorm2d(6),
        ).double()
        _randomise_batchnorm(model, generator)
        model.eval()
        x = torch.randn(2, 4, 5, 5, generator=generator, dtype=torch.float64)
        err = (fold_batchnorm(model)(x) - model(x)).abs().max().item()
        assert err < 1e-10, f"groups={groups}: max abs error {err:.3e}"


def test_fold_creates_missing_conv_bias() -> None:
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5)).double()
    _randomise_batchnorm(model, generator)
    model.eval()
    x = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    folded = fold_batchnorm(model)
    assert folded[0].bias is not None, "a bias-free conv needs a bias after folding"
    err = (folded(x) - model(x)).abs().max().item()
    assert err < 1e-10, f"max abs error {err:.3e}"
