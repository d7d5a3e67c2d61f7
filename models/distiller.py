"""LightningModule that distils a slim Wav2Lip student from a frozen teacher.

Loss = w_teacher * L1(student, teacher) + w_gt * L1(student, ground truth)
     + w_feature * mean over taps of MSE(adapter(student feature), teacher feature).
The feature term follows GAN Compression (Li et al., CVPR 2020): learnable 1x1 convs map the
student's decoder features to the teacher's width. Adapters exist for training only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from compress.metrics import psnr_db
from models.wav2lip import Wav2Lip

log = logging.getLogger(__name__)

TEACHER_PREFIX = "teacher."


class DistillationModule(L.LightningModule):
    """Trains ``student`` to imitate a frozen ``teacher`` on Wav2Lip windows."""

    def __init__(
        self,
        student: Wav2Lip,
        teacher: Wav2Lip | None,
        optimizer: Callable[..., torch.optim.Optimizer],
        teacher_l1: float = 1.0,
        ground_truth_l1: float = 1.0,
        feature: float = 1.0,
        feature_taps: Sequence[int] = (3, 4, 5),
    ) -> None:
        super().__init__()
        if teacher is None:
            # Training a teacher: the generator learns from ground truth alone.
            if teacher_l1 or feature:
                raise ValueError("without a teacher, distill.teacher_l1 and distill.feature must "
                                 f"be 0 (got {teacher_l1}, {feature}); set them to 0")
            feature_taps = ()
        if len(feature_taps) < 1 and feature > 0:
            raise ValueError("feature distillation needs at least one tap in distill.feature_taps")
        bad = [t for t in feature_taps if not 0 <= t < len(student.face_decoder_blocks)]
        if bad:
            raise ValueError(f"feature_taps {bad} are not decoder blocks 0-"
                             f"{len(student.face_decoder_blocks) - 1}")
        self.save_hyperparameters(ignore=["student", "teacher", "optimizer"])
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.optimizer_factory = optimizer
        self.taps = tuple(int(t) for t in feature_taps)
        s_widths = student.decoder_widths()
        t_widths = teacher.decoder_widths() if teacher is not None else []
        self.adapters = nn.ModuleDict({
            str(t): nn.Conv2d(s_widths[t], t_widths[t], kernel_size=1) for t in self.taps
        })
        # The teacher comes from its own file on every run; checkpoints hold only what trains.
        self.strict_loading = False

    def train(self, mode: bool = True) -> DistillationModule:
        """Switch train/eval mode, keeping the teacher in eval (frozen BatchNorm statistics)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        return self.student(mel, face)

    def _losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mel, face, target = batch["mel"], batch["face"], batch["target"]
        student_out, student_feats = self.student.forward_with_features(mel, face, self.taps)
        losses = {"l1_gt": F.l1_loss(student_out, target)}
        teacher_out = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_out, teacher_feats = self.teacher.forward_with_features(
                    mel, face, self.taps)
            losses["l1_teacher"] = F.l1_loss(student_out, teacher_out)
        else:
            losses["l1_teacher"] = student_out.new_zeros(())
        if self.taps:
            losses["feature"] = torch.stack([
                F.mse_loss(self.adapters[str(t)](student_feats[t]), teacher_feats[t])
                for t in self.taps
            ]).mean()
        else:
            losses["feature"] = student_out.new_zeros(())
        hp = self.hparams
        losses["loss"] = (hp.teacher_l1 * losses["l1_teacher"]
                          + hp.ground_truth_l1 * losses["l1_gt"] + hp.feature * losses["feature"])
        if teacher_out is not None:
            losses["psnr_teacher"] = psnr_db(student_out.detach(), teacher_out)
        losses["psnr_gt"] = psnr_db(student_out.detach(), target)
        return losses

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        size = batch["face"].shape[0]
        total = losses.pop("loss")
        self.log("train/loss", total, prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=size)
        return total

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        losses = self._losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, sync_dist=True,
                      batch_size=batch["face"].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [*self.student.parameters(), *self.adapters.parameters()]
        return self.optimizer_factory(params=trainable)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]
        checkpoint["student_slim"] = self.student.slim
        # The architecture travels with the weights, so no training config is needed to rebuild it.
        checkpoint["student_spec"] = self.student.spec.to_dict()
