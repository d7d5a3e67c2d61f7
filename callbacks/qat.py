"""Quantization-aware training of the student as a Lightning callback.

Schedule, in optimizer steps (``trainer.global_step``), after the usual QAT recipe (start from a
trained float model, freeze BatchNorm statistics a little later, then freeze the observers so
the scales stop moving):

- ``setup``: the student is traced and prepared with torchao's PT2E QAT flow
  (:func:`compress.qat.prepare_qat`). This hook runs before Lightning restores a checkpoint,
  wraps the module for DDP and calls ``configure_optimizers``, so the optimizer holds the
  prepared parameters, DDP wraps the prepared graph like any submodule, and a checkpoint saved
  in the middle of QAT loads into the same graph. Fake quantization is off: the student trains
  as float until ``start_step``.
- ``start_step``: fake quantization and observers on.
- ``freeze_bn_step``: BatchNorm uses and keeps its running statistics. The activation
  observers keep their moving averages: restarting them from one batch here gave ranges so
  narrow that the student learned to lean on the clamps (int8 vs float: 8 dB PSNR on the
  sample clips).
- ``freeze_observer_step``: observers off; the scales are frozen. With ``calibrate_ranges``
  the activation ranges are first set from histograms of ``calibration_batches`` training
  batches, as post-training calibration sets them (rank 0's on every rank under DDP). With
  ``freeze_observer_step == start_step`` QAT fine-tunes the post-training int8 network.
- ``on_train_end`` (before ``ExportStudent``'s ``on_fit_end``): the QAT student is converted to
  int8 and saved as ``student_qat_int8.pt2`` beside ``qat_report.json`` (QAT against
  post-training quantization of the same weights), then a plain float ``Wav2Lip`` with the
  trained weights goes back into ``pl_module.student`` for the other exports.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from callbacks.export import flatten_windows
from compress.fold import fold_batchnorm
from compress.qat import STUDENT_ATTR, QATStudent, convert_qat, prepare_qat
from compress.quantize import check_keep_float, psnr, quantize_int8, save_program

log = logging.getLogger(__name__)

# Checkpoint keys of the LightningModule's student (DistillationModule.student).
_STUDENT_KEY = "student."
_PREPARED_KEY = f"{_STUDENT_KEY}prepared.{STUDENT_ATTR}."


@dataclasses.dataclass(frozen=True)
class QATPhase:
    """Where the schedule is: which QAT switches are on."""

    fake_quant: bool = False
    observing: bool = False
    bn_frozen: bool = False

    @property
    def name(self) -> str:
        if not self.fake_quant:
            return "float" + (", BN frozen" if self.bn_frozen else "")
        parts = ["fake quant", "observing" if self.observing else "observers frozen"]
        if self.bn_frozen:
            parts.append("BN frozen")
        return ", ".join(parts)


def _batches(loader: Iterable, limit: int) -> list[tuple[Tensor, Tensor]]:
    return [flatten_windows(b) for b in itertools.islice(loader, limit)]


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


class QuantizationAwareTraining(L.Callback):
    """Prepares the student for QAT at setup, runs the schedule, exports int8 at the end.

    Args:
        output_dir: Folder for ``student_qat_int8.pt2`` and ``qat_report.json``.
        start_step: Step at which fake quantization and observers switch on.
        freeze_bn_step: Step from which BatchNorm statistics are frozen; None: never.
        freeze_observer_step: Step from which observers are off (scales frozen); None: never.
        keep_float: Student module paths whose convs stay float (``ConvInt8Quantizer``).
        calibrate_ranges: At ``freeze_observer_step``, set the activation ranges from
            histograms (post-training calibration) instead of keeping the moving min/max.
        calibration_batches: Training batches calibrating the ranges at the observer freeze
            and the post-training int8 comparison.
        validation_batches: Held-out validation batches on which the report measures PSNR.
    """

    def __init__(
        self,
        output_dir: str,
        start_step: int = 0,
        freeze_bn_step: int | None = None,
        freeze_observer_step: int | None = None,
        keep_float: Sequence[str] = (),
        calibrate_ranges: bool = False,
        calibration_batches: int = 8,
        validation_batches: int = 4,
    ) -> None:
        if start_step < 0:
            raise ValueError(f"qat.start_step must be >= 0, got {start_step}")
        for key, step in (("freeze_bn_step", freeze_bn_step),
                          ("freeze_observer_step", freeze_observer_step)):
            if step is not None and step < start_step:
                raise ValueError(f"qat.{key} ({step}) comes before qat.start_step "
                                 f"({start_step}); freeze after QAT starts, or set it to null")
        for key, count in (("calibration_batches", calibration_batches),
                           ("validation_batches", validation_batches)):
            if count < 1:
                raise ValueError(f"qat.{key} must be >= 1, got {count}")
        self.output_dir = Path(output_dir)
        self.start_step = start_step
        self.freeze_bn_step = freeze_bn_step
        self.freeze_observer_step = freeze_observer_step
        self.keep_float = tuple(keep_float)
        self.calibrate_ranges = calibrate_ranges
        self.calibration_batches = calibration_batches
        self.validation_batches = validation_batches
        # The phase of the last training step; validation and a resumed run use it as is.
        self.phase = QATPhase()
        self.step = 0
        self.outputs: dict[str, str] = {}

    def _schedule(self) -> dict[str, int | None]:
        return {"start_step": self.start_step, "freeze_bn_step": self.freeze_bn_step,
                "freeze_observer_step": self.freeze_observer_step,
                "calibrate_ranges": self.calibrate_ranges}

    def phase_at(self, step: int) -> QATPhase:
        """The phase the schedule gives to the training step ``step``."""
        def reached(at: int | None) -> bool:
            return at is not None and step >= at

        started = reached(self.start_step)
        return QATPhase(fake_quant=started,
                        observing=started and not reached(self.freeze_observer_step),
                        bn_frozen=reached(self.freeze_bn_step))

    def check(self, student: nn.Module) -> None:
        """Before training: raise ValueError if ``keep_float`` names no conv of ``student``."""
        check_keep_float(student, self.keep_float)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        student = getattr(pl_module, "student", None)
        if stage != "fit" or isinstance(student, QATStudent):
            return
        if not isinstance(student, nn.Module) or not hasattr(student, "forward_with_features"):
            raise TypeError("QuantizationAwareTraining needs a LightningModule whose `student` "
                            f"is a Wav2Lip, got {type(student).__name__}")
        # The loss asks for these taps; the traced graph returns exactly them.
        taps = tuple(getattr(pl_module, "taps", ()))
        pl_module.student = prepare_qat(student, taps=taps, keep_float=self.keep_float)

    def _sync(self, pl_module: L.LightningModule) -> None:
        student = pl_module.student
        if not isinstance(student, QATStudent):
            return
        wanted = dataclasses.astuple(self.phase)
        if (student.fake_quant, student.observing, student.bn_frozen) != wanted:
            student.set_phase(*wanted)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        phase = self.phase_at(trainer.global_step)
        if phase != self.phase:
            log.info("QAT at step %d: %s", trainer.global_step, phase.name)
            freezing = phase.fake_quant and not phase.observing and (
                self.phase.observing or not self.phase.fake_quant)
            if freezing and self.calibrate_ranges:
                self._calibrate(trainer, pl_module)
        self.phase, self.step = phase, trainer.global_step
        self._sync(pl_module)

    def _calibrate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        student = pl_module.student
        if not isinstance(student, QATStudent):
            return
        device = pl_module.device
        batches = [(mel.to(device), face.to(device)) for mel, face in
                   _batches(trainer.datamodule.train_dataloader(), self.calibration_batches)]
        ranges = student.calibrate_activations(batches)
        # Ranks saw different batches; they must quantize alike.
        student.set_activation_ranges(trainer.strategy.broadcast(ranges, src=0))
        log.info("QAT activation ranges calibrated on %d batches at step %d", len(batches),
                 trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        # The prefix tells other tools where a mid-QAT checkpoint keeps the student's weights.
        return {"step": self.step, "phase": dataclasses.asdict(self.phase),
                "schedule": self._schedule(), "float_student_prefix": _PREPARED_KEY}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]
        self.phase = QATPhase(**state_dict["phase"])
        if state_dict["schedule"] != self._schedule():
            log.warning("resuming QAT with schedule %s instead of the checkpoint's %s: the new "
                        "one applies from step %d", self._schedule(), state_dict["schedule"],
                        self.step)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint["state_dict"]
        if any(k.startswith(_PREPARED_KEY) for k in state):
            return
        # A checkpoint from before QAT (float student): the module ignored its student keys,
        # which do not match the prepared graph's; copy them in by name.
        float_state = {k.removeprefix(_STUDENT_KEY): v for k, v in state.items()
                       if k.startswith(_STUDENT_KEY)}
        if float_state and isinstance(pl_module.student, QATStudent):
            pl_module.student.load_float_state_dict(float_state)
            log.info("QAT starts from the float student of a checkpoint saved before QAT")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        student = pl_module.student
        if not isinstance(student, QATStudent):
            return
        if self.phase.fake_quant:
            self._export(trainer, pl_module, student)
        else:
            log.warning("QAT never started (qat.start_step=%d, %d steps trained): no QAT export; "
                        "lower qat.start_step or train longer", self.start_step,
                        trainer.global_step)
        # Every rank swaps back, so that the module's state dict has the float layout again.
        pl_module.student = student.to_float()

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule,
                student: QATStudent) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        program = convert_qat(student)
        program_path = self.output_dir / "student_qat_int8.pt2"
        save_program(program, program_path)
        report = self._report(trainer, pl_module, student, program.module())
        report["file_bytes"] = {"student_qat_int8": program_path.stat().st_size}
        report_path = self.output_dir / "qat_report.json"
        _write_json(report_path, report)
        quality = report["psnr_db"]
        log.info("QAT int8 vs float student: %.2f dB; post-training int8 of the same weights: "
                 "%.2f dB", quality["qat_int8_vs_float_student"],
                 quality["ptq_int8_vs_float_student"])
        self.outputs = {"QAT int8 export": str(program_path), "QAT report": str(report_path)}

    @torch.no_grad()
    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, student: QATStudent,
                qat_int8: nn.Module) -> dict[str, Any]:
        datamodule = trainer.datamodule
        calibration = _batches(datamodule.train_dataloader(), self.calibration_batches)
        validation = _batches(datamodule.val_dataloader(), self.validation_batches)
        fake_quant = copy.deepcopy(student).cpu().eval()
        float_student = student.to_float().cpu().eval()
        ptq_int8 = quantize_int8(fold_batchnorm(float_student), calibration,
                                 self.keep_float).module()

        def run(model: nn.Module) -> Tensor:
            return torch.cat([model(mel, face) for mel, face in validation])

        reference = run(float_student)
        outputs = {"qat_int8": run(qat_int8), "ptq_int8": run(ptq_int8)}
        quality = {f"{k}_vs_float_student": psnr(v, reference) for k, v in outputs.items()}
        # How closely the int8 program reproduces the fake-quantized network it was trained as.
        quality["qat_int8_vs_fake_quant"] = psnr(outputs["qat_int8"], run(fake_quant))
        teacher = getattr(pl_module, "teacher", None)
        teacher_std = None
        if teacher is not None:
            teacher_out = run(copy.deepcopy(teacher).float().cpu().eval())
            teacher_std = float(teacher_out.std())
            quality["float_student_vs_teacher"] = psnr(reference, teacher_out)
            quality.update({f"{k}_vs_teacher": psnr(v, teacher_out) for k, v in outputs.items()})
        return {
            "schedule": self._schedule(),
            "steps": trainer.global_step,
            "keep_float": list(self.keep_float),
            "psnr_db": quality,
            # PSNR against a nearly flat output says little; the spread tells.
            "output_std": {"float_student": float(reference.std()), "teacher": teacher_std},
            "frames": {"calibration_batches": len(calibration),
                       "validation_frames": sum(m.shape[0] for m, _ in validation)},
        }
