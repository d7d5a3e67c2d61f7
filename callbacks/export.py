"""At the end of fit: fuse the student for inference, export fp32, bf16 and int8, report.

Exports are ``torch.export`` programs with a dynamic batch dimension, loadable with plain
``torch`` (+ ``torchao`` for the int8 one) and none of this repository's code: fp32, bf16 (float32
in and out, see :func:`compress.exports.export_bf16`) and static int8, whose ``keep_float``
layers stay float (listed by hand, and/or the ``keep_float_auto`` most sensitive ones by
:func:`compress.sensitivity.layer_sensitivity`). With ``onnx`` on, the same inference network
also goes to ONNX Runtime: ``student.onnx`` (float32) and ``student_int8.onnx`` (static int8 QDQ,
every conv quantized: ``keep_float`` names PyTorch modules and applies to the ``.pt2`` only).
All of them are compared with the float student in ``report.json``. The float student is also
saved as a
self-describing checkpoint (``student.pt``: spec + weights) for
:func:`models.student.load_student`, to fine-tune or evaluate it without the training config.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from compress.complexity import count_macs, count_parameters
from compress.exports import export_bf16
from compress.fold import fuse_for_inference
from compress.onnx_export import INPUT_NAMES, export_onnx, quantize_onnx_int8
from compress.quantize import check_keep_float, export_float, psnr, quantize_int8, save_program
from compress.sensitivity import layer_sensitivity, most_sensitive
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
    """Writes ``student.pt``, ``student_{fp32,bf16,int8}.pt2``, ONNX files and ``report.json``.

    Args:
        output_dir: Folder for the files (created).
        calibration_batches: Training batches that calibrate the int8 activation ranges.
        keep_float: Student module paths (``named_modules()`` names, e.g.
            ``output_block.1``, or a block such as ``output_block``) whose convs stay float in
            the int8 program.
        keep_float_auto: Also keep this many of the most sensitive convs float, ranked by
            quantizing one conv at a time (:mod:`compress.sensitivity`); costs one calibration
            per conv, so it is off (0) by default.
        onnx: Also write ``student.onnx`` and ``student_int8.onnx`` for ONNX Runtime.
    """

    def __init__(
        self,
        output_dir: str,
        calibration_batches: int = 8,
        keep_float: Sequence[str] = (),
        keep_float_auto: int = 0,
        onnx: bool = True,
    ) -> None:
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
        if keep_float_auto < 0:
            raise ValueError(f"keep_float_auto must be >= 0, got {keep_float_auto}")
        self.output_dir = Path(output_dir)
        self.calibration_batches = calibration_batches
        self.keep_float = tuple(str(path) for path in keep_float)
        self.keep_float_auto = keep_float_auto
        self.onnx = onnx
        self.outputs: dict[str, str] = {}

    def check(self, student: nn.Module) -> None:
        """Before training: raise ValueError if ``keep_float`` names no conv of ``student``."""
        check_keep_float(student, self.keep_float)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            log.warning("training was interrupted: no export written")
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        student = copy.deepcopy(pl_module.student).float().cpu().eval()
        checkpoint_path = save_student(student, self.output_dir / "student.pt")
        fused = fuse_for_inference(student)
        datamodule = trainer.datamodule
        calibration = list(_inputs(datamodule.train_dataloader(), self.calibration_batches))
        validation = list(_inputs(datamodule.val_dataloader(), 4))
        keep_float, sensitivity = self._keep_float(fused, calibration, validation)

        programs = {
            "fp32": export_float(fused, calibration[0]),
            "bf16": export_bf16(fused, calibration[0]),
            "int8": quantize_int8(fused, calibration, keep_float),
        }
        paths = {kind: self.output_dir / f"student_{kind}.pt2" for kind in programs}
        for kind, program in programs.items():
            save_program(program, paths[kind])
        variants = {k: programs[k].module() for k in ("bf16", "int8")}
        if self.onnx:
            paths["onnx_fp32"] = export_onnx(fused, calibration[0],
                                             self.output_dir / "student.onnx")
            paths["onnx_int8"] = quantize_onnx_int8(paths["onnx_fp32"], calibration,
                                                    self.output_dir / "student_int8.onnx")
            variants.update({kind: _OnnxRunner(paths[kind])
                             for kind in ("onnx_fp32", "onnx_int8")})

        report = self._report(pl_module.teacher, student, fused, variants, validation, paths,
                              len(calibration))
        report["keep_float"] = list(keep_float)
        if sensitivity is not None:
            report["sensitivity"] = sensitivity
        report_path = self.output_dir / "report.json"
        tmp = report_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, report_path)
        log.info("export report:\n%s", format_report(report))
        self.outputs = {"student checkpoint": str(checkpoint_path),
                        "float export": str(paths["fp32"]), "bf16 export": str(paths["bf16"]),
                        "int8 export": str(paths["int8"])}
        if self.onnx:
            self.outputs.update({"ONNX float export": str(paths["onnx_fp32"]),
                                 "ONNX int8 export": str(paths["onnx_int8"])})
        self.outputs["report"] = str(report_path)

    def _keep_float(
        self,
        fused: nn.Module,
        calibration: list[tuple[torch.Tensor, torch.Tensor]],
        validation: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[tuple[str, ...], list[dict] | None]:
        if self.keep_float_auto == 0:
            return self.keep_float, None
        rows = layer_sensitivity(fused, calibration, validation)
        auto = most_sensitive(rows, self.keep_float_auto)
        log.info("keeping the %d most sensitive convs float: %s", len(auto), ", ".join(auto))
        return tuple(dict.fromkeys([*self.keep_float, *auto])), rows

    @torch.no_grad()
    def _report(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        fused: nn.Module,
        variants: dict[str, nn.Module],
        validation: list[tuple[torch.Tensor, torch.Tensor]],
        paths: dict[str, Path],
        n_calibration: int,
    ) -> dict:
        if teacher is None:
            # Training a teacher from scratch: the reference widths are the original's.
            teacher = Wav2Lip()
            teacher_out = None
        else:
            teacher = copy.deepcopy(teacher).float().cpu().eval()
            teacher_out = torch.cat([teacher(mel, face) for mel, face in validation])
        reference = torch.cat([fused(mel, face) for mel, face in validation])
        outputs = {kind: torch.cat([variant(mel, face) for mel, face in validation])
                   for kind, variant in variants.items()}
        t_macs, s_macs = count_macs(teacher), count_macs(student)
        spec = getattr(student, "spec", None)
        return {
            "student_preset": spec.name if spec is not None else None,
            "student_spec": spec.to_dict() if spec is not None else None,
            "student_slim": getattr(student, "slim", None),
            "parameters": {"teacher": count_parameters(teacher),
                           "student": count_parameters(student)},
            "macs_per_frame": {"teacher": t_macs, "student": s_macs},
            "file_bytes": {f"student_{kind}": path.stat().st_size
                           for kind, path in paths.items()},
            "psnr_db": {
                **{f"{kind}_vs_float_student": psnr(out, reference)
                   for kind, out in outputs.items()},
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


class _OnnxRunner:
    """Runs an ONNX file in ONNX Runtime's CPU provider like a module: ``runner(mel, face)``."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        feed = {name: t.detach().float().cpu().numpy()
                for name, t in zip(INPUT_NAMES, (mel, face))}
        return torch.from_numpy(self.session.run(None, feed)[0])


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
    fp32 = sizes["student_fp32"]
    files = [f"{key.removeprefix('student_')} {size / 1e6:.2f} MB ({size / fp32:.2f}x)"
             for key, size in sizes.items() if key != "student_fp32"]
    lines.append(f"student file: fp32 {fp32 / 1e6:.2f} MB, {', '.join(files)}")
    line = f"PSNR int8 vs float student: {quality['int8_vs_float_student']:.2f} dB"
    if quality["float_student_vs_teacher"] is not None:
        line += f"; float student vs teacher: {quality['float_student_vs_teacher']:.2f} dB"
    lines.append(line)
    for kind in ("bf16", "onnx_fp32", "onnx_int8"):
        if f"{kind}_vs_float_student" in quality:
            value = quality[f"{kind}_vs_float_student"]
            lines.append(f"PSNR {kind} vs float student: {value:.2f} dB")
    if report.get("keep_float"):
        lines.append(f"kept float in int8: {', '.join(report['keep_float'])}")
    spread = report["output_std"]["float_student"]
    lines.append(f"student output std: {spread:.3f}")
    if spread < FLAT_OUTPUT_STD:
        lines.append("warning: the student's output is nearly constant, so these PSNRs say "
                     "little; train longer, from a real teacher")
    return "\n".join(lines)
