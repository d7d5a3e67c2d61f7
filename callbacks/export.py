"""At the end of fit: fold the student's BatchNorm, quantize it to int8, export both, report.

Exports are ``torch.export`` programs with a dynamic batch dimension, loadable with plain
``torch`` (+ ``torchao`` for the int8 one) and none of this repository's code. The float student
is also saved as a self-describing checkpoint (``student.pt``: spec + weights) for
:func:`models.student.load_student`, to fine-tune or evaluate it without the training config.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from compress.complexity import count_macs, count_parameters
from compress.fold import fold_batchnorm
from compress.quantize import export_float, psnr, quantize_int8, save_program
from models.student import save_student
from models.wav2lip import Wav2Lip

log = logging.getLogger(__name__)

# Below this pixel standard deviation an output image is close to flat grey.
FLAT_OUTPUT_STD = 0.03


def flatten_windows(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """5-D training windows to the 4-D inference layout: mel (N,1,80,16), face (N,6,96,96)."""
    mel, face = batch["mel"], batch["face"]
    return mel.flatten(0, 1).float(), face.transpose(1, 2).flatten(0, 1).float()


def _inputs(loader: Iterable, limit: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in itertools.islice(loader, limit):
        yield flatten_windows(batch)


class ExportStudent(L.Callback):
    """Writes ``student.pt``, ``student_fp32.pt2``, ``student_int8.pt2`` and ``report.json``."""

    def __init__(self, output_dir: str, calibration_batches: int = 8) -> None:
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
        self.output_dir = Path(output_dir)
        self.calibration_batches = calibration_batches
        self.outputs: dict[str, str] = {}

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            log.warning("training was interrupted: no export written")
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        student = copy.deepcopy(pl_module.student).float().cpu().eval()
        checkpoint_path = save_student(student, self.output_dir / "student.pt")
        folded = fold_batchnorm(student)
        datamodule = trainer.datamodule
        calibration = list(_inputs(datamodule.train_dataloader(), self.calibration_batches))
        validation = list(_inputs(datamodule.val_dataloader(), 4))

        float_program = export_float(folded, calibration[0])
        int8_program = quantize_int8(folded, calibration)
        float_path = self.output_dir / "student_fp32.pt2"
        int8_path = self.output_dir / "student_int8.pt2"
        save_program(float_program, float_path)
        save_program(int8_program, int8_path)

        report = self._report(pl_module.teacher, student, folded, int8_program.module(),
                              validation, float_path, int8_path, len(calibration))
        report_path = self.output_dir / "report.json"
        tmp = report_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, report_path)
        log.info("export report:\n%s", format_report(report))
        self.outputs = {"student checkpoint": str(checkpoint_path),
                        "float export": str(float_path), "int8 export": str(int8_path),
                        "report": str(report_path)}

    @torch.no_grad()
    def _report(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        folded: nn.Module,
        quantized: nn.Module,
        validation: list[tuple[torch.Tensor, torch.Tensor]],
        float_path: Path,
        int8_path: Path,
        n_calibration: int,
    ) -> dict:
        if teacher is None:
            # Training a teacher from scratch: the reference widths are the original's.
            teacher = Wav2Lip()
            teacher_out = None
        else:
            teacher = copy.deepcopy(teacher).float().cpu().eval()
            teacher_out = torch.cat([teacher(mel, face) for mel, face in validation])
        reference = torch.cat([folded(mel, face) for mel, face in validation])
        int8_out = torch.cat([quantized(mel, face) for mel, face in validation])
        t_macs, s_macs = count_macs(teacher), count_macs(student)
        spec = getattr(student, "spec", None)
        return {
            "student_preset": spec.name if spec is not None else None,
            "student_spec": spec.to_dict() if spec is not None else None,
            "student_slim": getattr(student, "slim", None),
            "parameters": {"teacher": count_parameters(teacher),
                           "student": count_parameters(student)},
            "macs_per_frame": {"teacher": t_macs, "student": s_macs},
            "file_bytes": {"student_fp32": float_path.stat().st_size,
                           "student_int8": int8_path.stat().st_size},
            "psnr_db": {
                "int8_vs_float_student": psnr(int8_out, reference),
                "float_student_vs_teacher": (psnr(reference, teacher_out)
                                             if teacher_out is not None else None),
            },
            # PSNR against a nearly constant output (a random teacher, a barely trained student)
            # is high whatever the quantization does: the spread tells whether it means much.
            "output_std": {"float_student": float(reference.std()),
                           "teacher": (float(teacher_out.std())
                                       if teacher_out is not None else None)},
            "frames": {"calibration_batches": n_calibration,
                       "validation_frames": sum(m.shape[0] for m, _ in validation)},
        }


def format_report(report: dict) -> str:
    """A short aligned table of the export report."""
    params, macs = report["parameters"], report["macs_per_frame"]
    sizes, quality = report["file_bytes"], report["psnr_db"]
    rows = [
        ("parameters", f"{params['teacher']:,}", f"{params['student']:,}",
         f"{params['teacher'] / params['student']:.1f}x"),
    ]
    for key, label in (("macs_convt_output", "GMACs/frame (convT by output)"),
                       ("macs_convt_input", "GMACs/frame (convT by input)")):
        t, s = macs["teacher"][key], macs["student"][key]
        rows.append((label, f"{t / 1e9:.3f}", f"{s / 1e9:.3f}", f"{t / s:.1f}x"))
    lines = [f"student preset: {report.get('student_preset')}"]
    lines.append(f"{'':32}{'teacher':>14}{'student':>14}{'ratio':>9}")
    lines += [f"{a:32}{b:>14}{c:>14}{d:>9}" for a, b, c, d in rows]
    fp32, int8 = sizes["student_fp32"], sizes["student_int8"]
    lines.append(f"student file: fp32 {fp32 / 1e6:.2f} MB, int8 {int8 / 1e6:.2f} MB "
                 f"({int8 / fp32:.2f}x)")
    line = f"PSNR int8 vs float student: {quality['int8_vs_float_student']:.2f} dB"
    if quality["float_student_vs_teacher"] is not None:
        line += f"; float student vs teacher: {quality['float_student_vs_teacher']:.2f} dB"
    lines.append(line)
    spread = report["output_std"]["float_student"]
    lines.append(f"student output std: {spread:.3f}")
    if spread < FLAT_OUTPUT_STD:
        lines.append("warning: the student's output is nearly constant, so these PSNRs say "
                     "little; train longer, from a real teacher")
    return "\n".join(lines)
