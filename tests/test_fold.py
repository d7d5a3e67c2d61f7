"""BatchNorm folding and ReLU fusion: the inference network computes what the student computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.fold import (
    ConvReLU2d,
    ConvTransposeReLU2d,
    fold_batchnorm,
    fuse_for_inference,
)
from models.wav2lip import Conv2d, Conv2dTranspose, Wav2Lip


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


def _wrongly_fuse_residuals(model: nn.Module) -> int:
    """Fuse the ReLU of every residual block too, as a naive conv-BN-ReLU fuser would."""
    count = 0
    for block in model.modules():
        if isinstance(block, Conv2d) and block.residual:
            block.conv_block[0] = ConvReLU2d.from_conv(block.conv_block[0])
            block.act = nn.Identity()
            count += 1
    return count


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fused_student_matches_unfused(dtype: torch.dtype) -> None:
    """Slim 0.125 keeps every residual layer of the original: 28 residual, 22 plain blocks."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(4)
    model = Wav2Lip(slim=0.125)
    _randomise_batchnorm(model, generator)
    model = model.to(dtype).eval()
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, (Conv2d, Conv2dTranspose))}
    residual = [n for n, m in blocks.items() if isinstance(m, Conv2d) and m.residual]

    fused = fuse_for_inference(model)

    assert len(blocks) == 50 and len(residual) == 28, (len(blocks), len(residual))
    fused_convs = [n for n, m in fused.named_modules()
                   if isinstance(m, (ConvReLU2d, ConvTransposeReLU2d))]
    assert len(fused_convs) == len(blocks) - len(residual) == 22, fused_convs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()), "BatchNorm left"
    fused_blocks = dict(fused.named_modules())
    for name in residual:
        block = fused_blocks[name]
        assert type(block.conv_block[0]) is nn.Conv2d, f"{name}: ReLU fused before the add"
        assert isinstance(block.act, nn.ReLU), f"{name}: the ReLU after the add is gone"
    assert fused.state_dict().keys() == fold_batchnorm(model).state_dict().keys()
    assert isinstance(model.face_encoder_blocks[1][1].act, nn.ReLU), "fuse modified its input"

    # Every block's output, residual ones included, not only the network's.
    outputs: dict[str, list[torch.Tensor]] = {}
    for net in (model, fused):
        for name, block in net.named_modules():
            if name in blocks:
                block.register_forward_hook(
                    lambda _m, _i, out, name=name: outputs.setdefault(name, []).append(out)
                )
    mel, face = _inputs(3, generator, dtype)
    with torch.no_grad():
        reference = model(mel, face)
        out = fused(mel, face)
    assert reference.std() > 0.01, f"reference output nearly constant (std {reference.std():.2e})"
    worst = max(((a - b).abs().max().item(), n) for n, (a, b) in outputs.items())
    assert worst[0] < 1e-5, f"block {worst[1]}: fused vs unfused max abs error {worst[0]:.3e}"
    err = (out - reference).abs().max().item()
    print(f"{dtype}: max abs error, output {err:.2e}, worst block {worst[0]:.2e} ({worst[1]})")
    assert err < 1e-5, f"fused vs unfused max abs error {err:.3e} ({dtype})"

    # The rule matters: also fusing the residual blocks' ReLU changes the network.
    assert _wrongly_fuse_residuals(fused) == 28
    with torch.no_grad():
        wrong = fused(mel, face)
    wrong_err = (wrong - reference).abs().max().item()
    assert wrong_err > 1e-2, f"fusing before the residual add changed only {wrong_err:.3e}"
