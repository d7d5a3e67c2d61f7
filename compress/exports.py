"""Float exports beside the int8 program, and compiling any of them for CPU inference.

- :func:`export_bf16`: a ``torch.export`` program whose weights and arithmetic are bfloat16, for
  CPUs with bf16 units (AVX512-BF16, AMX). It takes and returns float32 tensors, casting at the
  boundary, so callers swap it in for the float program without touching their data.
- :func:`compile_program`: ``torch.compile`` with Inductor's freezing on, which is what lowers the
  int8 program's quantize/dequantize patterns to oneDNN int8 convolutions and prepacks the
  weights of every variant.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch._inductor import config as inductor_config
from torch.export import ExportedProgram

from compress.quantize import export_float

__all__ = ["Bf16Boundary", "compile_program", "export_bf16"]

log = logging.getLogger(__name__)


class Bf16Boundary(nn.Module):
    """A bfloat16 copy of a generator behind float32 inputs and outputs.

    Args:
        model: Float generator called as ``model(audio, face)``; it is copied, not modified.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.net = copy.deepcopy(model).to(torch.bfloat16).eval()

    def forward(self, audio: Tensor, face: Tensor) -> Tensor:
        out = self.net(audio.to(torch.bfloat16), face.to(torch.bfloat16))
        return out.to(torch.float32)


@torch.no_grad()
def export_bf16(model: nn.Module, example: tuple[Tensor, Tensor]) -> ExportedProgram:
    """Export a bf16 variant of a float generator with a dynamic batch dimension.

    Args:
        model: Float generator, best already fused (:func:`compress.fold.fuse_for_inference`)
            so that BatchNorm is folded in float64 before the weights are rounded to bf16.
        example: One float32 ``(audio, face)`` batch; only its sample shapes matter.

    Returns:
        The program; ``program.module()(audio, face)`` takes and returns float32 at any batch.
    """
    return export_float(Bf16Boundary(model), example)


def compile_program(program: ExportedProgram) -> Callable[[Tensor, Tensor], Tensor]:
    """``torch.compile`` an exported generator for CPU inference; returns ``fn(audio, face)``.

    Freezing turns weights into constants, which lets Inductor prepack them and, for an int8
    program, replace each dequantize-conv-(ReLU-quantize) pattern with one oneDNN int8
    convolution. Compilation happens on the first call at each batch size, so the returned
    function makes each call with Inductor's ``freezing`` switched on (the torchao x86 recipe
    sets it globally; here it is scoped to the call) and under ``torch.no_grad()``, without which
    freezing does not apply. Shapes are static: each new batch size compiles once more (up to
    ``torch._dynamo.config.recompile_limit`` of them), because the dynamic-batch int8 conv
    lowering of torch 2.11 fails a stride check at compile time.
    """
    compiled = torch.compile(program.module(), dynamic=False)

    def run(audio: Tensor, face: Tensor) -> Tensor:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(audio, face)

    return run
