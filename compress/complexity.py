"""Parameter and multiply-accumulate (MAC) counts for Wav2Lip generators.

Convolution MACs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts a transposed
convolution by its *input* positions (every input pixel meets the whole kernel once: the true
multiply count) and reports FLOPs as two per MAC. thop, and the 28x figure of Nota's compressed
Wav2Lip, count transposed convolutions by their *output* positions instead, which inflates
Wav2Lip's decoder by about half. Both conventions are returned; say which one you quote. Biases,
BatchNorm, ReLU, additions and concatenations are not counted.

As a command, it prints both counts for the teacher and for student presets of ``conf/student``::

    python -m compress.complexity                   # every preset
    python -m compress.complexity --preset nota_like micro
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_parameters", "main", "preset_names", "size_table"]

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "student"

# FlopCounterMode keys its counts by overload packet, not by overload.
_CONV_OPS = (
    torch.ops.aten.convolution,
    torch.ops.aten._convolution,
    torch.ops.aten.convolution_overrideable,
)


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameter elements (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int = 96) -> dict[str, int]:
    """Count convolution MACs for one frame: a 6 x S x S face and a 1 x 80 x 16 mel, batch 1.

    Args:
        model: A Wav2Lip-style generator called as ``model(audio, face)``.
        img_size: Face crop side S in pixels.

    Returns:
        ``macs_convt_input``: transposed convs counted by input positions (true multiplies).
        ``macs_convt_output``: transposed convs counted by output positions (thop convention).
        ``macs_convt_only_input`` / ``macs_convt_only_output``: the transposed-conv share of each.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    audio = torch.zeros(1, 1, 80, 16, device=device, dtype=dtype)
    face = torch.zeros(1, 6, img_size, img_size, device=device, dtype=dtype)

    by_input, by_output = 0, 0

    def on_convt(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal by_input, by_output
        assert isinstance(module, nn.ConvTranspose2d), "hook registered on a non-ConvTranspose2d"
        # Weight is (in, out / groups, kH, kW), so its numel is in * out / groups * kH * kW.
        per_position = module.weight.numel()
        batch = inputs[0].shape[0]
        by_input += batch * inputs[0].shape[2:].numel() * per_position
        by_output += batch * out.shape[2:].numel() * per_position

    handles = [
        m.register_forward_hook(on_convt)
        for m in model.modules()
        if isinstance(m, nn.ConvTranspose2d)
    ]
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(audio, face)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    counts = counter.get_flop_counts()["Global"]
    other = {str(op): n for op, n in counts.items() if op not in _CONV_OPS and n}
    if other:
        log.warning("count_macs ignores non-convolution FLOPs: %s", other)
    conv_flops = sum(n for op, n in counts.items() if op in _CONV_OPS)
    # FlopCounterMode counts two FLOPs per multiply-accumulate.
    macs_input = conv_flops // 2
    return {
        "macs_convt_input": macs_input,
        "macs_convt_output": macs_input - by_input + by_output,
        "macs_convt_only_input": by_input,
        "macs_convt_only_output": by_output,
    }


def preset_names(preset_dir: Path = PRESET_DIR) -> list[str]:
    """Names of the student presets (``conf/student/*.yaml``)."""
    return sorted(p.stem for p in preset_dir.glob("*.yaml"))


def _preset_model(name: str, preset_dir: Path) -> nn.Module:
    # Imported here: the counters above stay usable without the models package or omegaconf.
    from omegaconf import OmegaConf

    from models.spec import StudentSpec
    from models.wav2lip import Wav2Lip

    path = preset_dir / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no student preset {name!r} in {preset_dir}; choose from "
                         f"{preset_names(preset_dir)}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return Wav2Lip(spec=StudentSpec(**{k: v for k, v in cfg.items() if not k.startswith("_")}))


def size_table(names: Sequence[str], img_size: int = 96, preset_dir: Path = PRESET_DIR) -> str:
    """Parameters and MACs per frame (both conventions) of the teacher and the named presets."""
    from models.wav2lip import Wav2Lip

    models = {"teacher": Wav2Lip(), **{n: _preset_model(n, preset_dir) for n in names}}
    figures = {}
    for name, model in models.items():
        macs = count_macs(model, img_size)
        figures[name] = (count_parameters(model), macs["macs_convt_output"],
                         macs["macs_convt_input"])
    header = (f"{'model':<12}{'parameters':>13}{'ratio':>8}{'GMACs convT-out':>17}{'ratio':>8}"
              f"{'GMACs convT-in':>16}{'ratio':>8}")
    lines = [header]
    base = figures["teacher"]
    for name, (params, out, inp) in figures.items():
        lines.append(f"{name:<12}{params:>13,}{base[0] / params:>7.1f}x{out / 1e9:>17.3f}"
                     f"{base[1] / out:>7.1f}x{inp / 1e9:>16.3f}{base[2] / inp:>7.1f}x")
    lines.append(f"per {img_size}x{img_size} frame, convolutions only; convT-out counts "
                 "transposed convs by output positions (thop), convT-in by input positions")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: print :func:`size_table` for the presets named (default: all)."""
    parser = argparse.ArgumentParser(prog="python -m compress.complexity",
                                     description=size_table.__doc__)
    parser.add_argument("presets", nargs="*", help="preset names in conf/student (default all)")
    parser.add_argument("--preset", action="append", default=[], dest="more",
                        help="a preset name; may repeat")
    parser.add_argument("--img-size", type=int, default=96, help="face crop side in pixels")
    args = parser.parse_args(argv)
    names = [*args.presets, *args.more] or preset_names()
    try:
        table = size_table(names, args.img_size)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    print(table)


if __name__ == "__main__":
    main()
