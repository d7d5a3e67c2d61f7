"""The distillation module: a frozen teacher, and a student that really learns to imitate it."""

import functools
import pytest
import torch

from data.dataset import WindowDataset
from data.synthetic import make_synthetic_dataset
from models.distiller import DistillationModule
from models.wav2lip import Wav2Lip


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "s", n_clips=2, n_val=1)
    dataset = WindowDataset(root, "train", length=1, deterministic=True)
    return torch.utils.data.default_collate([dataset[0]])


def expressive_teacher() -> Wav2Lip:
    """A random generator is nearly constant grey; a sharper output layer gives it contrast."""
    torch.manual_seed(0)
    teacher = Wav2Lip(slim=0.5).eval()
    with torch.no_grad():
        teacher.output_block[1].weight.mul_(40)
    return teacher


def make_module(teacher: Wav2Lip, **weights: float) -> DistillationModule:
    torch.manual_seed(1)
    optimizer = functools.partial(torch.optim.Adam, lr=3e-3)
    return DistillationModule(Wav2Lip(slim=0.25), teacher, optimizer, **weights)


def test_overfit_halves_student_to_teacher_l1(batch: dict[str, torch.Tensor]) -> None:
    teacher = expressive_teacher()
    with torch.no_grad():
        spread = teacher(batch["mel"], batch["face"]).std().item()
    assert spread > 0.08, f"teacher output is nearly constant (std {spread:.3f})"
    module = make_module(teacher, ground_truth_l1=0.0, feature=0.1).train()
    optimizer = module.configure_optimizers()
    history = []
    for _ in range(25):
        losses = module._losses(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(losses["l1_teacher"].item())
    first, last = history[0], history[-1]
    assert last <= 0.5 * first, f"L1 to teacher went {first:.4f} -> {last:.4f}"
    assert all(p.grad is None for p in module.teacher.parameters())


def test_teacher_stays_frozen_and_out_of_checkpoints(batch: dict[str, torch.Tensor]) -> None:
    teacher = expressive_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = make_module(teacher).train()
    assert not module.teacher.training and module.student.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    module._losses(batch)  # a train-mode forward must not touch the teacher's BN statistics
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    trainable = {id(p) for group in module.configure_optimizers().param_groups
                 for p in group["params"]}
    assert not trainable & {id(p) for p in teacher.parameters()}

    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = checkpoint["state_dict"].keys()
    assert not any(k.startswith("teacher.") for k in keys)
    assert any(k.startswith("student.") for k in keys)
    assert any(k.startswith("adapters.") for k in keys)


def test_feature_adapters_map_student_to_teacher_widths() -> None:
    module = make_module(expressive_teacher(), feature_taps=(2, 5))
    assert module.adapters["2"].in_channels == 128 and module.adapters["2"].out_channels == 256
    assert module.adapters["5"].in_channels == 32 and module.adapters["5"].out_channels == 64
    with pytest.raises(ValueError, match="not decoder blocks"):
        make_module(expressive_teacher(), feature_taps=(9,))


def test_loss_terms_are_weighted_as_configured(batch: dict[str, torch.Tensor]) -> None:
    module = make_module(expressive_teacher(), teacher_l1=2.0, ground_truth_l1=0.5, feature=3.0)
    with torch.no_grad():
        losses = module._losses(batch)
    expected = 2.0 * losses["l1_teacher"] + 0.5 * losses["l1_gt"] + 3.0 * losses["feature"]
    assert torch.allclose(losses["loss"], expected)
    assert losses["feature"] > 0
