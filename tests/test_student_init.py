"""Teacher initialisation: coupled channel groups proved by permutation, and a better start."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.init import channel_groups, group_importance, init_from_teacher_
from models.spec import StudentSpec
from models.wav2lip import Wav2Lip

NO_RESIDUALS = {"face_residuals": (0,) * 6, "audio_residuals": (0,) * 4,
                "decoder_residuals": (0,) * 6}


def _inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 80, 16, generator=generator), torch.rand(n, 6, 96, 96,
                                                                       generator=generator)


def _calibrate(model: Wav2Lip, audio: torch.Tensor, face: torch.Tensor) -> Wav2Lip:
    """Set BatchNorm statistics to the model's own activations, as a trained network has."""
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(audio, face)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def teacher() -> Wav2Lip:
    """A random teacher with distinct BatchNorm scales, shifts and statistics in every channel."""
    torch.manual_seed(0)
    model = Wav2Lip()
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.1)
    _calibrate(model, *_inputs(4, 1))
    with torch.no_grad():
        model.output_block[1].weight.mul_(4)  # contrast: a random generator is nearly grey
    return model


def _scrambled(name: str, layers: list[nn.Module]) -> torch.Tensor:
    width = layers[0].conv_block[1].num_features
    return torch.randperm(width).double()


def _tied(name: str, layers: list[nn.Module]) -> torch.Tensor:
    return torch.zeros(layers[0].conv_block[1].num_features)


def test_groups_cover_every_layer_once(teacher: Wav2Lip) -> None:
    groups = channel_groups(teacher)
    paths = [p for members in groups.values() for p in members]
    wrappers = sum(1 for m in teacher.modules() if hasattr(m, "conv_block"))
    assert len(paths) == len(set(paths)) == wrappers == 50, (len(paths), wrappers)
    assert groups["face2"] == [f"face_encoder_blocks.2.{r}" for r in range(4)]
    assert groups["audio3"] == ["audio_encoder.9", "audio_encoder.10"]


@pytest.fixture(scope="module")
def teacher64(teacher: Wav2Lip) -> Wav2Lip:
    # Float64 makes the check exact: a permuted sum differs from the original in rounding only.
    model = Wav2Lip().double().eval()
    model.load_state_dict(teacher.state_dict())
    return model


@pytest.mark.parametrize("importance", ["l1", _scrambled])
def test_full_width_student_is_the_teacher(teacher64: Wav2Lip, importance) -> None:
    """Slim 1.0 with every residual kept reproduces the teacher under any channel order."""
    torch.manual_seed(3)
    student = init_from_teacher_(Wav2Lip().double().eval(), teacher64, importance)
    moved = student.face_encoder_blocks[2][0].conv_block[1].running_mean
    original = teacher64.face_encoder_blocks[2][0].conv_block[1].running_mean
    assert not torch.equal(moved, original), "the importance order left channels in place"
    audio, face = (t.double() for t in _inputs(1, 2))
    with torch.no_grad():
        expected, got = teacher64(audio, face), student(audio, face)
    err = (got - expected).abs().max().item()
    assert err < 1e-12, f"max abs difference {err:.3e} ({importance})"


def test_permuted_teacher_gives_the_same_student(teacher: Wav2Lip) -> None:
    """Shuffling each coupled group of the teacher changes neither it nor the slim student."""
    torch.manual_seed(4)
    shuffled = init_from_teacher_(Wav2Lip().eval(), teacher, _scrambled)
    audio, face = _inputs(1, 2)
    with torch.no_grad():
        err = (shuffled(audio, face) - teacher(audio, face)).abs().max().item()
    assert err < 1e-4, f"shuffled teacher differs by {err:.2e} (float32 rounding is ~1e-5)"
    for importance in ("l1", "bn_scale"):
        from_original = init_from_teacher_(Wav2Lip(0.5), teacher, importance).state_dict()
        from_shuffled = init_from_teacher_(Wav2Lip(0.5), shuffled, importance).state_dict()
        for key, value in from_original.items():
            assert torch.allclose(value.float(), from_shuffled[key].float(), atol=1e-6), key


@pytest.fixture(scope="module")
def redundant(teacher: Wav2Lip) -> Wav2Lip:
    """The teacher with half of every group's channels made nearly silent (weights and BN x0.05).

    A trained network's channels differ in importance; a random one's do not, so this plants a
    known answer that both scores must find.
    """
    torch.manual_seed(5)
    model = Wav2Lip().eval()
    model.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for paths in channel_groups(model).values():
            layers = [model.get_submodule(p) for p in paths]
            width = layers[0].conv_block[1].num_features
            quiet = torch.randperm(width)[: width // 2]
            for layer in layers:
                conv, bn = layer.conv_block
                weight = conv.weight.transpose(0, 1) if conv.transposed else conv.weight
                weight[quiet] *= 0.05
                conv.bias[quiet] *= 0.05
                bn.weight[quiet] *= 0.05
                bn.bias[quiet] = 0.0
    return model


@pytest.mark.parametrize("importance", ["l1", "bn_scale"])
def test_half_width_start_is_closer_than_random(redundant: Wav2Lip, importance: str) -> None:
    audio, face = _inputs(2, 6)
    torch.manual_seed(7)
    random_student = Wav2Lip(0.5).eval()
    initialised = init_from_teacher_(Wav2Lip(0.5).eval(), redundant, importance)
    with torch.no_grad():
        target = redundant(audio, face)
        init_err = (initialised(audio, face) - target).abs().mean().item()
        random_err = (random_student(audio, face) - target).abs().mean().item()
    assert target.std() > 0.05, f"teacher output is nearly constant (std {target.std():.3f})"
    assert init_err < 0.5 * random_err, (
        f"L1 to teacher: teacher-initialised {init_err:.4f}, random {random_err:.4f}")


def test_dropped_residuals_take_the_first_teacher_layers(teacher: Wav2Lip) -> None:
    spec = StudentSpec(face_residuals=(0, 1, 0, 0, 0, 0), audio_residuals=(1, 0, 2, 0))
    # Equal scores keep the teacher's channel order, so whole tensors can be compared.
    student = init_from_teacher_(Wav2Lip(spec=spec), teacher, _tied)
    assert torch.equal(student.face_encoder_blocks[1][1].conv_block[0].weight,
                       teacher.face_encoder_blocks[1][1].conv_block[0].weight)
    # Audio: stage 0 keeps teacher layer 1; stage 1 (teacher 3) lands at 2; stage 2 (6-8) at 3-5.
    pairs = {0: 0, 1: 1, 2: 3, 3: 6, 4: 7, 5: 8, 6: 9, 7: 11, 8: 12}
    assert len(student.audio_encoder) == len(pairs)
    for s, t in pairs.items():
        assert torch.equal(student.audio_encoder[s].conv_block[1].running_var,
                           teacher.audio_encoder[t].conv_block[1].running_var), (s, t)


def test_nota_like_start_copies_top_channels(teacher: Wav2Lip) -> None:
    spec = StudentSpec(slim=0.25, **NO_RESIDUALS)
    student = init_from_teacher_(Wav2Lip(spec=spec), teacher, "bn_scale")
    scores = group_importance(teacher, "bn_scale")["dec3"]
    top = torch.sort(scores, descending=True, stable=True).indices[:96]
    assert torch.equal(student.face_decoder_blocks[3][0].conv_block[1].weight,
                       teacher.face_decoder_blocks[3][0].conv_block[1].weight[top])


def test_errors_are_one_line(teacher: Wav2Lip) -> None:
    with pytest.raises(ValueError, match="at least as wide") as err:
        init_from_teacher_(Wav2Lip(), Wav2Lip(0.5))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="residual layers"):
        init_from_teacher_(Wav2Lip(0.25), Wav2Lip(spec=StudentSpec(**NO_RESIDUALS)))
    with pytest.raises(ValueError, match="is not one of"):
        init_from_teacher_(Wav2Lip(0.25), teacher, "l2")
    with pytest.raises(ValueError, match="one score per channel"):
        init_from_teacher_(Wav2Lip(0.25), teacher, lambda name, layers: torch.zeros(3))
