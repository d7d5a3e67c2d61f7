"""LightningModule that distils a slim Wav2Lip student from a frozen teacher, or trains one.

The generator loss is a plain weighted sum of the terms in :mod:`models.losses` (weights in
``conf/distill/default.yaml``; a term is logged as ``train/<name>`` and ``val/<name>``):

    loss = teacher_l1 * l1_teacher + ground_truth_l1 * l1_gt + feature * feature
         + sync_weight * sync + ssim * ssim + gan.weight * perceptual

The original Wav2Lip's ``(1 - sync - disc) * L1`` weighting is not reproduced: with a plain sum
each weight means the same whatever the others are. ``sync_weight`` is ``sync`` once switched on
(``sync_switch_on``: the original's rule, after a validation epoch whose mean sync loss is below
it). Feature distillation follows GAN Compression (Li et al., CVPR 2020): learnable 1x1 convs map
student features at named taps to the teacher's width; the adapters exist for training only.

With ``teacher=None`` the same module trains a generator from ground truth (+ sync + SSIM). With
``gan.enabled`` it adds the original's visual-quality discriminator under manual optimisation.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from compress.metrics import lower_half, psnr_db, ssim_index
from models.discriminator import QualityDiscriminator
from models.losses import (
    feature_distillation_loss,
    mouth_weighted_l1,
    ssim_loss,
    sync_loss,
    weighted_sum,
)
from models.sync_scores import lse_scores, sync_distances
from models.syncnet import SyncNet
from models.wav2lip import TAP_NAMES, Wav2Lip

__all__ = ["DEFAULT_TAPS", "DistillationModule", "GanSettings", "RecipeError"]

log = logging.getLogger(__name__)

# Frozen networks reloaded from their own files on every run; checkpoints leave them out.
FROZEN_PREFIXES = ("teacher.", "syncnet.")
# The decoder stages at 12, 24 and 48 px.
DEFAULT_TAPS = ("face_decoder.3", "face_decoder.4", "face_decoder.5")
SYNC_STATE_KEY = "sync_switched_on"


class RecipeError(ValueError):
    """A loss-recipe setting or a batch that cannot work; the message names the key and the fix."""


@dataclass(frozen=True)
class GanSettings:
    """The optional adversarial stage (``distill.gan``), with the original's visual discriminator.

    Attributes:
        enabled: Train with the discriminator (manual optimisation, two optimisers).
        start_step: Generator step from which the perceptual term and discriminator updates run;
            before it the stage is off (e.g. distil first, then fine-tune adversarially).
        weight: Weight of the perceptual term ``BCE(D(student), 1)`` (original: 0.07).
        lr: Discriminator Adam learning rate (betas ``betas``, as the original).
        betas: Discriminator Adam betas.
        gradient_clip_val: Gradient-norm clip for both optimisers under manual optimisation (the
            trainer's ``gradient_clip_val`` does not apply there); null: no clipping.
        checkpoint: Released-format ``visual_quality_disc.pth`` to start from; read by
            ``train.py``, which builds the discriminator (null: random initialisation).
    """

    enabled: bool = False
    start_step: int = 0
    weight: float = 0.07
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    gradient_clip_val: float | None = None
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.start_step < 0 or self.weight < 0 or self.lr <= 0:
            raise RecipeError(f"distill.gan needs start_step >= 0, weight >= 0 and lr > 0, got "
                              f"{self.start_step}, {self.weight}, {self.lr}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


def _gan_settings(gan: Mapping | GanSettings | None) -> GanSettings:
    if isinstance(gan, GanSettings):
        return gan
    known = {f.name for f in fields(GanSettings)}
    unknown = sorted(set(gan or {}) - known)
    if unknown:
        raise RecipeError(f"distill.gan has no key(s) {unknown}; use {', '.join(sorted(known))}")
    return GanSettings(**dict(gan or {}))


def _tap_names(taps: Sequence[str | int]) -> tuple[str, ...]:
    names = tuple(f"face_decoder.{t}" if isinstance(t, int) else str(t) for t in taps)
    legacy = [name for tap, name in zip(taps, names) if isinstance(tap, int)]
    if legacy:
        # Taps used to be decoder block indices; names also reach the encoders.
        warnings.warn(f"integer feature taps are deprecated since 0.1 and will be removed; "
                      f"write {legacy}", FutureWarning, stacklevel=3)
    return names


def _check_recipe(
    weights: Mapping[str, float], sync_switch_on: float | None, taps: Sequence[str],
    has_teacher: bool,
) -> None:
    negative = {k: v for k, v in weights.items() if v < 0}
    if negative:
        raise RecipeError(f"distill weights must be >= 0, got {negative}; set them to 0 or more")
    if sync_switch_on is not None and sync_switch_on <= 0:
        raise RecipeError(f"distill.sync_switch_on must be > 0 or null (always on), got "
                          f"{sync_switch_on}")
    if not has_teacher and (weights["teacher_l1"] or weights["feature"]):
        # Training a teacher: the generator learns from ground truth (+ sync, SSIM) alone.
        raise RecipeError("without a teacher, distill.teacher_l1 and distill.feature must be 0 "
                          f"(got {weights['teacher_l1']}, {weights['feature']}); set them to 0")
    unknown = [t for t in taps if t not in TAP_NAMES]
    if unknown:
        raise RecipeError(f"distill.feature_taps {unknown} are not tap names; use "
                          f"{', '.join(TAP_NAMES)}")
    if weights["feature"] > 0 and not taps:
        raise RecipeError("distill.feature > 0 needs at least one tap in distill.feature_taps "
                          "(e.g. face_decoder.4), or set feature to 0")


def _adapter_key(tap: str) -> str:
    # ModuleDict keys cannot contain dots.
    return tap.replace(".", "_")


class DistillationModule(L.LightningModule):
    """Trains ``student`` to imitate a frozen ``teacher`` (or ground truth alone) on windows.

    Batches are dicts: ``face`` (B, 6, 5, 96, 96), ``mel`` (B, 5, 1, 80, 16), ``target``
    (B, 3, 5, 96, 96); with a SyncNet also ``sync_mel`` (B, 1, 80, 16), the mel window of the
    5-frame sync window, and, on validation batches, optionally ``sync_mels`` (B, 2K+1, 1, 80, 16)
    for offsets -K..K frames, which adds LSE-D / LSE-C style scores (``val/lse_d``, ``val/lse_c``
    and the teacher's ``val/lse_d_teacher``, ``val/lse_c_teacher``).
    """

    def __init__(
        self,
        student: Wav2Lip,
        teacher: Wav2Lip | None,
        optimizer: Callable[..., torch.optim.Optimizer],
        teacher_l1: float = 1.0,
        ground_truth_l1: float = 1.0,
        feature: float = 1.0,
        feature_taps: Sequence[str | int] = DEFAULT_TAPS,
        mouth_weight: float = 0.0,
        sync: float = 0.03,
        sync_switch_on: float | None = 0.75,
        ssim: float = 0.0,
        gan: Mapping | GanSettings | None = None,
        syncnet: SyncNet | None = None,
        discriminator: QualityDiscriminator | None = None,
    ) -> None:
        super().__init__()
        taps = _tap_names(feature_taps)
        _check_recipe({"teacher_l1": teacher_l1, "ground_truth_l1": ground_truth_l1,
                       "feature": feature, "mouth_weight": mouth_weight, "sync": sync,
                       "ssim": ssim}, sync_switch_on, taps, teacher is not None)
        self.gan = _gan_settings(gan)
        if self.gan.enabled and discriminator is None:
            raise RecipeError("distill.gan.enabled needs a discriminator (train.py builds one); "
                              "pass discriminator=QualityDiscriminator() or disable the stage")
        self.save_hyperparameters(ignore=["student", "teacher", "optimizer", "syncnet",
                                          "discriminator"])

        self.student = student
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.syncnet = syncnet.eval().requires_grad_(False) if syncnet is not None else None
        self.discriminator = discriminator if self.gan.enabled else None
        self.optimizer_factory = optimizer
        # No teacher or no feature weight: no tap is computed and no adapter is trained.
        self.taps = taps if teacher is not None and feature > 0 else ()
        self.adapters = nn.ModuleDict()
        if self.taps:
            s_widths, t_widths = student.feature_widths(), teacher.feature_widths()
            for tap in self.taps:
                self.adapters[_adapter_key(tap)] = nn.Conv2d(s_widths[tap], t_widths[tap], 1)
        self.loss_weights = {"l1_teacher": teacher_l1, "l1_gt": ground_truth_l1,
                             "feature": feature, "ssim": ssim, "sync": sync,
                             "perceptual": self.gan.weight}
        # The original's rule: no sync term until the generator roughly syncs on validation.
        self.sync_switched_on = sync_switch_on is None
        self.val_sync = MeanMetric()
        self._distances: dict[str, list[Tensor]] = {"student": [], "teacher": []}
        self._teacher_lse: tuple[float, float] | None = None
        # Manual optimisation only where two optimisers need it: automatic keeps gradient
        # accumulation, clipping and precision plugins working as configured on the trainer.
        self.automatic_optimization = not self.gan.enabled
        if syncnet is None and sync > 0:
            log.info("no SyncNet (sync.checkpoint is null): no sync term and no sync metrics")
        # Frozen networks come from their own files on every run; checkpoints hold what trains.
        self.strict_loading = False

    @property
    def sync_weight(self) -> float:
        """The sync term's weight now: ``sync`` once switched on, else 0."""
        return self.hparams.sync if self.sync_switched_on else 0.0

    def train(self, mode: bool = True) -> DistillationModule:
        """Switch train/eval mode, keeping the frozen networks in eval (BatchNorm statistics)."""
        super().train(mode)
        for frozen in (self.teacher, self.syncnet):
            if frozen is not None:
                frozen.eval()
        return self

    def forward(self, mel: Tensor, face: Tensor) -> Tensor:
        return self.student(mel, face)

    def _adversarial(self) -> bool:
        return self.gan.enabled and self.global_step >= self.gan.start_step

    def _step(
        self, batch: Mapping[str, Tensor], adversarial: bool = False
    ) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
        """Loss terms, their total (``loss``) and PSNRs; also the student's and teacher's outputs.

        Terms with weight 0 are still computed for the logs, without building a graph.
        """
        mel, face, target = batch["mel"], batch["face"], batch["target"]
        student_out, student_feats = self.student.forward_with_features(mel, face, self.taps)
        mouth = self.hparams.mouth_weight
        weights = {**self.loss_weights, "sync": self.sync_weight}
        terms = {"l1_gt": mouth_weighted_l1(student_out, target, mouth)}
        teacher_out = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_out, teacher_feats = self.teacher.forward_with_features(
                    mel, face, self.taps)
            terms["l1_teacher"] = mouth_weighted_l1(student_out, teacher_out, mouth)
            if self.taps:
                adapters = {t: self.adapters[_adapter_key(t)] for t in self.taps}
                terms["feature"] = feature_distillation_loss(student_feats, teacher_feats,
                                                             adapters)
        with torch.set_grad_enabled(torch.is_grad_enabled() and weights["ssim"] > 0):
            terms["ssim"] = ssim_loss(student_out, target)
        if self.syncnet is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and weights["sync"] > 0):
                terms["sync"] = sync_loss(self.syncnet, student_out, self._sync_mel(batch))
        if adversarial:
            # BCE is refused under CUDA autocast; the discriminator runs in float32 for it.
            with torch.autocast(student_out.device.type, enabled=False):
                terms["perceptual"] = self.discriminator.perceptual_loss(student_out.float())
        losses = {**terms, "loss": weighted_sum(terms, weights)}
        if teacher_out is not None:
            losses["psnr_teacher"] = psnr_db(student_out.detach(), teacher_out)
        losses["psnr_gt"] = psnr_db(student_out.detach(), target)
        return losses, student_out, teacher_out

    def _losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Loss terms, ``loss`` and PSNRs for ``batch`` (no adversarial term)."""
        return self._step(batch)[0]

    @staticmethod
    def _sync_mel(batch: Mapping[str, Tensor]) -> Tensor:
        if "sync_mel" not in batch:
            raise RecipeError("a SyncNet is given (sync.checkpoint) but the batch has no "
                              "'sync_mel'; use a data module that provides it, or set "
                              "sync.checkpoint=null")
        return batch["sync_mel"]

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            losses, _, _ = self._step(batch)
            self._log_train(losses, batch)
            return losses["loss"]

        adversarial = self._adversarial()
        generator_opt, discriminator_opt = self.optimizers()
        with self.toggled_optimizer(generator_opt):
            losses, student_out, _ = self._step(batch, adversarial)
            generator_opt.zero_grad()
            self.manual_backward(losses["loss"])
            generator_opt.step()
        if adversarial:
            with self.toggled_optimizer(discriminator_opt):
                with torch.autocast(student_out.device.type, enabled=False):
                    disc_loss = self.discriminator.discriminator_loss(
                        batch["target"].float(), student_out.float())
                discriminator_opt.zero_grad()
                self.manual_backward(disc_loss)
                # Stepping through the strategy (precision plugin, hooks, clipping) but not the
                # LightningOptimizer keeps it out of trainer.global_step, which would otherwise
                # count both optimisers (Lightning issue #17958): max_steps = generator steps.
                self.trainer.strategy.optimizer_step(discriminator_opt.optimizer, _no_closure)
            losses["discriminator"] = disc_loss.detach()
        self._log_train(losses, batch)
        return None

    def _log_train(self, losses: dict[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        size = batch["face"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"},
                      batch_size=size)
        if self.syncnet is not None:
            self.log("train/sync_weight", self.sync_weight, batch_size=size)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after AMP unscaling, so the clip applies to true gradient norms.
        if not self.automatic_optimization and self.gan.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gan.gradient_clip_val,
                                gradient_clip_algorithm="norm")

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        losses, student_out, teacher_out = self._step(batch)
        target = batch["target"]
        low = lower_half(student_out)
        losses["psnr_lower_gt"] = psnr_db(low, lower_half(target))
        losses["ssim_lower_gt"] = ssim_index(low, lower_half(target))
        if teacher_out is not None:
            losses["psnr_lower_teacher"] = psnr_db(low, lower_half(teacher_out))
            losses["ssim_lower_teacher"] = ssim_index(low, lower_half(teacher_out))
        if self.syncnet is not None:
            self.val_sync.update(losses["sync"])
            if "sync_mels" in batch:
                self._collect_distances(batch["sync_mels"], student_out, teacher_out)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, sync_dist=True,
                      batch_size=batch["face"].shape[0])

    def _collect_distances(
        self, sync_mels: Tensor, student_out: Tensor, teacher_out: Tensor | None
    ) -> None:
        self._distances["student"].append(
            sync_distances(self.syncnet, student_out.float(), sync_mels))
        if teacher_out is not None and self._teacher_lse is None:
            self._distances["teacher"].append(
                sync_distances(self.syncnet, teacher_out.float(), sync_mels))

    def on_validation_epoch_end(self) -> None:
        student, teacher = self._distances["student"], self._distances["teacher"]
        self._distances = {"student": [], "teacher": []}
        if self.trainer.sanity_checking:
            # A sanity pass sees a few batches only: it neither switches sync on nor fixes the
            # teacher's scores.
            self.val_sync.reset()
            return
        if student:
            lse_d, lse_c = lse_scores(self._gathered(student))
            self.log_dict({"val/lse_d": lse_d, "val/lse_c": lse_c})
        if teacher:
            # The teacher is frozen and validation data fixed: its scores are computed once.
            self._teacher_lse = lse_scores(self._gathered(teacher))
        if self._teacher_lse is not None:
            lse_d, lse_c = self._teacher_lse
            self.log_dict({"val/lse_d_teacher": lse_d, "val/lse_c_teacher": lse_c})
        if self.syncnet is not None and self.val_sync.update_count:
            self._maybe_switch_sync_on(float(self.val_sync.compute()))
        self.val_sync.reset()

    def _maybe_switch_sync_on(self, mean_sync: float) -> None:
        threshold = self.hparams.sync_switch_on
        if not self.sync_switched_on and mean_sync < threshold:
            self.sync_switched_on = True
            log.info("validation sync loss %.3f < %.3f: sync term on at weight %g",
                     mean_sync, threshold, self.hparams.sync)

    def _gathered(self, parts: list[Tensor]) -> Tensor:
        distances = torch.cat(parts)
        if self.trainer.world_size > 1:
            distances = self.all_gather(distances).flatten(0, 1)
        return distances

    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        trainable = [*self.student.parameters(), *self.adapters.parameters()]
        generator_opt = self.optimizer_factory(params=trainable)
        if not self.gan.enabled:
            return generator_opt
        discriminator_opt = torch.optim.Adam(self.discriminator.parameters(), lr=self.gan.lr,
                                             betas=self.gan.betas)
        return [generator_opt, discriminator_opt]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]
        checkpoint[SYNC_STATE_KEY] = self.sync_switched_on
        checkpoint["student_slim"] = self.student.slim
        # The architecture travels with the weights, so no training config is needed to rebuild it.
        checkpoint["student_spec"] = self.student.spec.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A run configured as always on stays on; otherwise the saved switch decides.
        saved = bool(checkpoint.get(SYNC_STATE_KEY, False))
        self.sync_switched_on = self.hparams.sync_switch_on is None or saved


def _no_closure() -> None:
    """The discriminator's loss is already backpropagated when its optimiser steps."""

