"""The distillation module: loss recipe, sync switch, GAN stage, validation metrics, grids."""

import functools
import types
from pathlib import Path

import cv2
import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader

from callbacks.image_grid import ImageGrid, image_grid
from compress.metrics import lower_half, psnr_db, ssim_index
from data.dataset import WindowDataset
from data.synthetic import make_synthetic_dataset
from models import distiller
from models.discriminator import NoNormConv2d, QualityDiscriminator
from models.distiller import DistillationModule, GanSettings, RecipeError
from models.losses import mouth_weighted_l1
from models.sync_scores import lse_scores, sync_distances
from models.syncnet import SyncNet
from models.wav2lip import Wav2Lip

SYNC_OFFSETS = 1  # validation windows carry mels for offsets -1, 0, 1


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """One window with ``sync_mel`` and ``sync_mels``, as the data module's validation gives."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "s", n_clips=2, n_val=1)
    dataset = WindowDataset(root, "train", length=1, deterministic=True,
                            sync_offsets=SYNC_OFFSETS)
    return torch.utils.data.default_collate([dataset[0]])


def expressive_teacher(slim: float = 0.5) -> Wav2Lip:
    """A random generator is nearly constant grey; a sharper output layer gives it contrast."""
    torch.manual_seed(0)
    teacher = Wav2Lip(slim=slim).eval()
    with torch.no_grad():
        teacher.output_block[1].weight.mul_(40)
    return teacher


def adam(lr: float = 3e-3) -> functools.partial:
    return functools.partial(torch.optim.Adam, lr=lr)


def make_module(teacher: Wav2Lip | None, slim: float = 0.25, **kwargs) -> DistillationModule:
    torch.manual_seed(1)
    return DistillationModule(Wav2Lip(slim=slim), teacher, adam(), **kwargs)


def expert() -> SyncNet:
    torch.manual_seed(2)
    return SyncNet().eval()


def cpu_trainer(**kwargs) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0)
    return L.Trainer(**{**settings, **kwargs})


def loader(batch: dict[str, torch.Tensor], n: int = 1, drop: tuple[str, ...] = ()) -> DataLoader:
    sample = {k: v[0] for k, v in batch.items() if k not in drop}
    return DataLoader([sample] * n, batch_size=1)


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


def test_frozen_networks_stay_frozen_and_out_of_checkpoints(
    batch: dict[str, torch.Tensor]
) -> None:
    teacher = expressive_teacher(0.125)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = make_module(teacher, slim=0.0625, syncnet=expert(), sync_switch_on=None).train()
    assert not module.teacher.training and not module.syncnet.training
    assert module.student.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not any(p.requires_grad for p in module.syncnet.parameters())
    module._losses(batch)["loss"].backward()  # must not touch the teacher's BN statistics
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in module.syncnet.parameters())
    trainable = {id(p) for group in module.configure_optimizers().param_groups
                 for p in group["params"]}
    assert not trainable & {id(p) for p in [*teacher.parameters(), *module.syncnet.parameters()]}

    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = checkpoint["state_dict"].keys()
    assert not any(k.startswith(("teacher.", "syncnet.")) for k in keys)
    assert any(k.startswith("student.") for k in keys)
    assert any(k.startswith("adapters.") for k in keys)


def test_feature_taps_by_name() -> None:
    taps = ["face_encoder.2", "audio_encoder", "face_decoder.5"]
    module = make_module(expressive_teacher(), feature_taps=taps)
    widths = {name: (a.in_channels, a.out_channels) for name, a in module.adapters.items()}
    # Student slim 0.25, teacher slim 0.5: face stage 2 is 64 wide in the original, the audio
    # embedding 512, decoder block 5 128.
    assert widths == {"face_encoder_2": (16, 32), "audio_encoder": (128, 256),
                      "face_decoder_5": (32, 64)}
    with pytest.warns(FutureWarning, match="face_decoder.4"):
        legacy = make_module(expressive_teacher(), feature_taps=(4,))
    assert legacy.taps == ("face_decoder.4",)
    with pytest.raises(RecipeError, match="face_decoder.9"):
        make_module(expressive_teacher(), feature_taps=("face_decoder.9",))
    # No teacher or no feature weight: no adapters to train.
    assert not make_module(expressive_teacher(), feature=0.0).adapters
    assert not make_module(None, teacher_l1=0.0, feature=0.0).adapters


def test_bad_recipe_values_are_one_line_errors() -> None:
    cases = [
        ({"mouth_weight": -1.0}, "mouth_weight"),
        ({"sync_switch_on": 0.0}, "distill.sync_switch_on"),
        ({"feature_taps": ()}, "distill.feature_taps"),
        ({"gan": {"enabled": True}}, "distill.gan.enabled needs a discriminator"),
        ({"gan": {"enable": True}}, "distill.gan has no key"),
        ({"gan": {"lr": 0.0}}, "distill.gan needs"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RecipeError, match=message) as err:
            make_module(expressive_teacher(0.125), slim=0.0625, **kwargs)
        assert "\n" not in str(err.value)


def test_loss_terms_are_weighted_as_configured(batch: dict[str, torch.Tensor]) -> None:
    module = make_module(expressive_teacher(0.125), slim=0.0625, teacher_l1=2.0,
                         ground_truth_l1=0.5, feature=3.0, ssim=1.5, mouth_weight=1.0)
    with torch.no_grad():
        losses = module._losses(batch)
        student = module.student(batch["mel"], batch["face"])
    expected = (2.0 * losses["l1_teacher"] + 0.5 * losses["l1_gt"] + 3.0 * losses["feature"]
                + 1.5 * losses["ssim"])
    assert torch.allclose(losses["loss"], expected)
    assert losses["feature"] > 0 and 0 < losses["ssim"] < 1
    assert "sync" not in losses, "no SyncNet, no sync term"
    assert losses["l1_gt"].item() == pytest.approx(
        mouth_weighted_l1(student, batch["target"], 1.0).item())


def test_missing_sync_mel_is_a_one_line_error(batch: dict[str, torch.Tensor]) -> None:
    module = make_module(None, slim=0.0625, teacher_l1=0.0, feature=0.0, syncnet=SyncNet())
    without = {k: v for k, v in batch.items() if k != "sync_mel"}
    with pytest.raises(RecipeError, match="no 'sync_mel'.*sync.checkpoint=null") as err:
        module._losses(without)
    assert "\n" not in str(err.value)


def test_sync_switch_on_rule_survives_a_checkpoint(
    batch: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    module = make_module(None, slim=0.0625, teacher_l1=0.0, feature=0.0, sync=0.5,
                         sync_switch_on=1e-6, syncnet=expert())
    trainer = cpu_trainer()
    data = loader(batch)
    assert module.sync_weight == 0.0
    [first] = trainer.validate(module, data, verbose=False)
    mean_sync = first["val/sync"]
    assert mean_sync > 1e-6 and module.sync_weight == 0.0, "above the threshold: still off"
    assert first["val/loss"] == pytest.approx(first["val/l1_gt"]), "sync weighs 0 while off"
    trainer.save_checkpoint(tmp_path / "off.ckpt")

    # As if configured with a threshold above this validation mean: the next epoch switches.
    module.hparams.sync_switch_on = mean_sync + 0.1
    trainer.validate(module, data, verbose=False)
    assert module.sync_weight == 0.5
    [after] = trainer.validate(module, data, verbose=False)
    assert after["val/loss"] == pytest.approx(after["val/l1_gt"] + 0.5 * after["val/sync"],
                                              rel=1e-5)
    trainer.save_checkpoint(tmp_path / "on.ckpt")

    saved = torch.load(tmp_path / "on.ckpt", weights_only=False)
    assert saved["sync_switched_on"] is True
    assert not any(k.startswith("syncnet.") for k in saved["state_dict"])
    for name, switched in (("off", False), ("on", True)):
        restored = DistillationModule.load_from_checkpoint(
            tmp_path / f"{name}.ckpt", student=Wav2Lip(slim=0.0625), teacher=None,
            optimizer=adam(), syncnet=SyncNet())
        assert restored.sync_switched_on is switched
        assert restored.sync_weight == (0.5 if switched else 0.0)


def tiny_discriminator() -> QualityDiscriminator:
    """The original discriminator's forward and losses on a few small layers, for speed."""
    torch.manual_seed(3)
    disc = QualityDiscriminator()
    disc.face_encoder_blocks = nn.ModuleList([nn.Sequential(NoNormConv2d(3, 8, 3, 4, 1)),
                                              nn.Sequential(NoNormConv2d(8, 8, 3, 4, 1))])
    disc.binary_pred = nn.Sequential(nn.Conv2d(8, 1, 1), nn.Sigmoid())
    return disc


def test_gan_stage_counts_generator_steps(batch: dict[str, torch.Tensor]) -> None:
    disc = tiny_discriminator()
    gan = GanSettings(enabled=True, start_step=1, gradient_clip_val=1.0)
    module = make_module(expressive_teacher(0.125), slim=0.0625, feature=0.0, gan=gan,
                         discriminator=disc)
    assert not module.automatic_optimization
    student_before = [p.detach().clone() for p in module.student.parameters()]
    disc_before = [p.detach().clone() for p in disc.parameters()]
    trainer = cpu_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, loader(batch, n=8))

    # max_steps means generator steps: 3 batches, 3 generator updates, and the discriminator
    # updated from generator step 1 on (start_step), so twice.
    assert trainer.global_step == 3
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3
    generator_opt, disc_opt = (o.optimizer if hasattr(o, "optimizer") else o
                               for o in trainer.optimizers)
    assert generator_opt.state[next(module.student.parameters())]["step"].item() == 3
    assert disc_opt.state[next(disc.parameters())]["step"].item() == 2
    assert any(not torch.equal(a, b) for a, b in zip(student_before, module.student.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(disc_before, disc.parameters()))
    metrics = trainer.callback_metrics
    assert {"train/perceptual", "train/discriminator", "train/l1_teacher"} <= metrics.keys()


def test_teacherless_training_runs(batch: dict[str, torch.Tensor]) -> None:
    module = make_module(None, slim=0.0625, teacher_l1=0.0, feature=0.0, ssim=1.0, sync=0.1,
                         sync_switch_on=None, syncnet=expert())
    before = [p.detach().clone() for p in module.student.parameters()]
    trainer = cpu_trainer(max_steps=1, val_check_interval=1, limit_val_batches=1)
    trainer.fit(module, loader(batch), loader(batch))
    assert trainer.global_step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters()))
    metrics = trainer.callback_metrics
    expected = {"train/loss", "train/l1_gt", "train/ssim", "train/sync", "val/psnr_lower_gt",
                "val/ssim_lower_gt", "val/psnr_gt", "val/sync", "val/lse_d", "val/lse_c"}
    assert expected <= metrics.keys(), sorted(metrics)
    assert not any("teacher" in key for key in metrics), sorted(metrics)
    assert metrics["train/sync_weight"] == pytest.approx(0.1)


def test_validation_metrics_against_the_teacher(
    batch: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = expressive_teacher(0.125)
    syncnet = expert()
    module = make_module(teacher, slim=0.0625, feature=0.0, syncnet=syncnet)
    calls = []

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return sync_distances(*args)

    monkeypatch.setattr(distiller, "sync_distances", counted)
    trainer = cpu_trainer()
    [metrics] = trainer.validate(module, loader(batch), verbose=False)

    module.eval()
    with torch.no_grad():
        student = module.student(batch["mel"], batch["face"])
        reference = teacher(batch["mel"], batch["face"])
    low, teacher_low = lower_half(student), lower_half(reference)
    assert metrics["val/psnr_lower_teacher"] == pytest.approx(
        psnr_db(low, teacher_low).item(), rel=1e-5)
    assert metrics["val/ssim_lower_teacher"] == pytest.approx(
        ssim_index(low, teacher_low).item(), abs=1e-5)
    assert metrics["val/psnr_lower_gt"] == pytest.approx(
        psnr_db(low, lower_half(batch["target"])).item(), rel=1e-5)
    assert metrics["val/psnr_teacher"] == pytest.approx(psnr_db(student, reference).item(),
                                                        rel=1e-5)
    with torch.no_grad():
        expected = lse_scores(sync_distances(syncnet, reference, batch["sync_mels"]))
    assert metrics["val/lse_d_teacher"] == pytest.approx(expected[0], rel=1e-4)
    assert metrics["val/lse_c_teacher"] == pytest.approx(expected[1], abs=1e-5)
    assert {"val/lse_d", "val/lse_c"} <= metrics.keys()
    assert len(calls) == 2, "student and teacher"

    [again] = trainer.validate(module, loader(batch), verbose=False)
    assert len(calls) == 3, "the frozen teacher's scores are computed once"
    assert again["val/lse_d_teacher"] == metrics["val/lse_d_teacher"]


# --- image grids ---------------------------------------------------------------------------------


def test_image_grid_layout() -> None:
    rows = [torch.stack([torch.full((3, 2, 2), 0.1 * (r * 3 + n + 1)) for n in range(3)])
            for r in range(2)]
    grid = image_grid(rows, padding=1, fill=1.0)
    assert grid.shape == (3, 2 * 3 + 1, 3 * 3 + 1)
    for r in range(2):
        for n in range(3):
            top, left = 1 + 3 * r, 1 + 3 * n
            tile = grid[:, top:top + 2, left:left + 2]
            assert torch.allclose(tile, torch.full_like(tile, 0.1 * (r * 3 + n + 1)))
    assert torch.all(grid[:, 0] == 1.0) and torch.all(grid[:, :, 3] == 1.0)


class RecordingWandb(WandbLogger):
    """Stands in for W&B: records ``log_image`` calls and nothing else."""

    def __init__(self) -> None:
        self.images: list[tuple] = []

    def log_image(self, key: str, images: list, step: int | None = None, **kwargs) -> None:
        self.images.append((key, images, step, kwargs))


def grid_trainer(batch: dict[str, torch.Tensor], loggers: list, root: Path,
                 step: int) -> types.SimpleNamespace:
    data = types.SimpleNamespace(val_dataloader=lambda: loader(batch))
    return types.SimpleNamespace(global_step=step, loggers=loggers, default_root_dir=str(root),
                                 datamodule=data)


def test_image_grid_callback(batch: dict[str, torch.Tensor], tmp_path: Path) -> None:
    module = make_module(expressive_teacher(0.125), slim=0.0625).train()
    callback = ImageGrid(every_n_steps=2, output_dir=str(tmp_path / "images"), samples=1)
    hook = functools.partial(callback.on_train_batch_end, pl_module=module, outputs=None,
                             batch=None, batch_idx=0)

    hook(grid_trainer(batch, [], tmp_path, step=2))
    hook(grid_trainer(batch, [CSVLogger(tmp_path)], tmp_path, step=3))
    assert not (tmp_path / "images").exists(), "no logger, or not a multiple of every_n_steps"

    hook(grid_trainer(batch, [CSVLogger(tmp_path)], tmp_path, step=4))
    png = cv2.imread(str(tmp_path / "images" / "step000004.png"))
    # 5 rows (masked input, reference, teacher, student, ground truth) of 5 frames, 2 px apart.
    assert png.shape == (5 * 98 + 2, 5 * 98 + 2, 3)
    assert module.training, "train mode restored"
    truth = (batch["target"][0, :, 0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    assert torch.equal(torch.from_numpy(png[2 + 4 * 98:][:96, 2:98]), truth), "BGR, row 5"

    wandb = RecordingWandb()
    hook(grid_trainer(batch, [wandb], tmp_path, step=6))
    [(key, [image], step, kwargs)] = wandb.images
    assert key == "val/grid" and step == 6 and "teacher, student" in kwargs["caption"][0]
    assert image.shape == png.shape and (image == png[..., ::-1]).all(), "RGB for W&B"
    assert not (tmp_path / "images" / "step000006.png").exists()

    with pytest.raises(ValueError, match="callbacks.image_grid.every_n_steps"):
        ImageGrid(every_n_steps=0)
