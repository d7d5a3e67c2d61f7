"""Per-layer int8 sensitivity: quantize one conv at a time and measure the output PSNR.

Nota's compressed Wav2Lip found that int8 everywhere hurt quality and that keeping the sensitive
layers in higher precision fixed it. :func:`layer_sensitivity` finds those layers: for each conv
(or transposed conv) it quantizes that layer alone with
:class:`~compress.quantize.ConvInt8Quantizer` (every other conv in ``keep_float``), calibrates it
on the given batches and compares the output with the float model's. The worst layers are the
candidates for ``export.keep_float``.

As a command, on a saved student and a preprocessed data folder::

    python -m compress.sensitivity --student export/student.pt --data /data/prepared \\
        --batches 8 --out sensitivity.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from compress.quantize import ConvInt8Quantizer, export_float, psnr

__all__ = ["conv_layers", "format_table", "layer_sensitivity", "main", "most_sensitive"]

log = logging.getLogger(__name__)

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def conv_layers(model: nn.Module) -> list[str]:
    """Module paths of every conv and transposed conv, in definition order."""
    return [name for name, m in model.named_modules() if isinstance(m, _CONVS)]


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    calibration: Sequence[tuple[Tensor, Tensor]],
    evaluation: Sequence[tuple[Tensor, Tensor]] | None = None,
    layers: Sequence[str] | None = None,
) -> list[dict]:
    """Quantize each conv alone to int8 and rank the layers by the output PSNR they leave.

    Args:
        model: BN-folded float generator (:func:`compress.fold.fuse_for_inference`).
        calibration: ``(audio, face)`` batches that set the activation ranges.
        evaluation: Batches on which the output is compared; the calibration ones if omitted.
        layers: Conv paths to measure (from :func:`conv_layers`); all of them if omitted.

    Returns:
        One row per layer, worst (lowest PSNR) first: ``layer``, ``kind`` (``conv`` or
        ``conv_transpose``), ``parameters`` and ``psnr_db`` (int8 layer vs float model).

    Raises:
        ValueError: If there is no calibration batch or a layer is not a conv of ``model``.
    """
    if not calibration:
        raise ValueError("calibration is empty: pass at least one (audio, face) batch")
    evaluation = calibration if evaluation is None else evaluation
    modules = dict(model.named_modules())
    convs = conv_layers(model)
    unknown = [name for name in layers or () if name not in convs]
    if unknown:
        raise ValueError(f"{unknown} are not convs of the model; pick from conv_layers(model)")
    model = model.eval()
    program = export_float(model, calibration[0])
    reference = [model(audio, face) for audio, face in evaluation]

    rows = []
    for layer in convs if layers is None else layers:
        others = [name for name in convs if name != layer]
        graph = prepare_pt2e(program.module(), ConvInt8Quantizer(keep_float=others))
        for audio, face in calibration:
            graph(audio, face)
        quantized = convert_pt2e(graph)
        outputs = [quantized(audio, face) for audio, face in evaluation]
        conv = modules[layer]
        rows.append({
            "layer": layer,
            "kind": "conv_transpose" if isinstance(conv, nn.ConvTranspose2d) else "conv",
            "parameters": sum(p.numel() for p in conv.parameters()),
            "psnr_db": psnr(torch.cat(outputs), torch.cat(reference)),
        })
        log.info("%s alone in int8: %.2f dB", layer, rows[-1]["psnr_db"])
    return sorted(rows, key=lambda row: row["psnr_db"])


def most_sensitive(rows: Sequence[dict], count: int) -> list[str]:
    """The ``count`` worst layers of a :func:`layer_sensitivity` report, worst first."""
    return [row["layer"] for row in sorted(rows, key=lambda row: row["psnr_db"])[:count]]


def format_table(rows: Sequence[dict]) -> str:
    """An aligned text table of a sensitivity report, in its order."""
    width = max([len("layer"), *(len(row["layer"]) for row in rows)])
    lines = [f"{'layer':{width}}  {'kind':>14}  {'parameters':>10}  {'PSNR dB':>8}"]
    for row in rows:
        value = "inf" if math.isinf(row["psnr_db"]) else f"{row['psnr_db']:.2f}"
        lines.append(f"{row['layer']:{width}}  {row['kind']:>14}  {row['parameters']:>10,}  "
                     f"{value:>8}")
    return "\n".join(lines)


def _batches(
    root: Path, count: int, batch_size: int
) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    # Imported here: the data stack (Lightning, audio) is not needed to rank layers in a test.
    from callbacks.export import flatten_windows
    from data.dataset import Wav2LipDataModule

    samples = count * batch_size
    data = Wav2LipDataModule(str(root), batch_size=batch_size, train_samples=samples,
                             val_samples=samples)
    data.setup("fit")
    # Calibrate on training windows, compare on validation ones, as the export does.
    calibration = [flatten_windows(b) for b in itertools.islice(data.train_dataloader(), count)]
    evaluation = [flatten_windows(b) for b in itertools.islice(data.val_dataloader(), count)]
    return calibration, evaluation


def main(argv: Iterable[str] | None = None) -> None:
    """Command line: print (and optionally save) the sensitivity table of a saved student."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, type=Path, help="student.pt from an export")
    parser.add_argument("--data", required=True, type=Path, help="preprocessed data root")
    parser.add_argument("--batches", type=int, default=4,
                        help="batches of 2 windows (10 frames) each, for calibration (training "
                        "windows) and for comparison (validation windows); default 4")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.batches < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")

    from compress.fold import fuse_for_inference
    from models.student import load_student

    try:
        model = fuse_for_inference(load_student(args.student))
        calibration, evaluation = _batches(args.data, args.batches, batch_size=2)
    except ValueError as err:  # DataError is one: a bad path or folder is one line, no traceback
        sys.exit(f"error: {err}")
    rows = layer_sensitivity(model, calibration, evaluation)
    print(format_table(rows))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
