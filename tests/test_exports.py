"""Deployable torch.export programs (int8, bf16) against the float student they came from."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from compress.exports import compile_program, export_bf16
from compress.fold import fuse_for_inference
from compress.quantize import load_program, psnr, quantize_int8, save_program
from models.wav2lip import Wav2Lip
from tests.test_quantize import PLAIN_SPEC, image_like, measure_batchnorm_

INT8_MIN_PSNR_DB = 35.0
BF16_MIN_PSNR_DB = 40.0
BATCH_SIZES = (1, 7, 128)
# PLAIN_SPEC is nota_like's shape: the kind of student that gets deployed, and its 23 convs
# (6 transposed) keep compilation short.
N_CONVS, N_TRANSPOSED = 23, 6


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(0)
    return fuse_for_inference(measure_batchnorm_(Wav2Lip(spec=PLAIN_SPEC)))


@pytest.fixture(scope="module")
def files(student: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    generator = torch.Generator().manual_seed(2)
    calibration = [image_like(8, generator) for _ in range(4)]
    folder = tmp_path_factory.mktemp("exports")
    programs = {"int8": quantize_int8(student, calibration),
                "bf16": export_bf16(student, calibration[0])}
    paths = {kind: folder / f"student_{kind}.pt2" for kind in programs}
    for kind, program in programs.items():
        save_program(program, paths[kind])
    return paths


def test_exports_match_float_student_in_fresh_process(
    student: nn.Module, files: dict[str, Path], tmp_path: Path
) -> None:
    """Plain torch + torchao load both files; batch sizes 1, 7 and 128 from one program each."""
    generator = torch.Generator().manual_seed(5)
    inputs = {n: image_like(n, generator) for n in BATCH_SIZES}
    inputs_path, outputs_path = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(inputs, inputs_path)
    script = textwrap.dedent(
        f"""
        import torch, torchao
        inputs = torch.load({str(inputs_path)!r})
        out = {{}}
        for kind, path in {({k: str(v) for k, v in files.items()})!r}.items():
            module = torch.export.load(path).module()
            with torch.no_grad():
                out[kind] = {{n: module(mel, face) for n, (mel, face) in inputs.items()}}
        torch.save(out, {str(outputs_path)!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -I: isolated mode, so neither the working directory nor PYTHONPATH can supply project code.
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(outputs_path)

    floors = {"int8": INT8_MIN_PSNR_DB, "bf16": BF16_MIN_PSNR_DB}
    for n, (mel, face) in inputs.items():
        with torch.no_grad():
            reference = student(mel, face)
        # A flat output would match whatever the export does.
        assert reference.std() > 0.05, f"batch {n}: float output std {reference.std():.3f}"
        for kind, floor in floors.items():
            out = outputs[kind][n]
            assert out.shape == (n, 3, 96, 96), f"{kind} batch {n}: {tuple(out.shape)}"
            assert out.dtype == torch.float32, f"{kind} batch {n}: {out.dtype}"
            quality = psnr(out, reference)
            print(f"{kind} batch {n}: {quality:.2f} dB vs float student")
            assert quality >= floor, f"{kind} batch {n}: {quality:.2f} dB vs float student"


def test_int8_file_stores_int8_weights(student: nn.Module, files: dict[str, Path]) -> None:
    program = load_program(files["int8"])
    stored = [*program.state_dict.values(), *program.constants.values()]
    int8 = [t for t in stored if t.dtype == torch.int8]
    convs = [m for m in student.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(int8) == len(convs) == N_CONVS, f"{len(int8)} int8 tensors, {len(convs)} convs"
    n_weights = sum(m.weight.numel() for m in convs)
    print(f"{len(int8)} int8 tensors ({sum(t.numel() for t in int8):,} elements) for "
          f"{len(convs)} convs ({n_weights:,} weights)")
    assert sum(t.numel() for t in int8) == n_weights, "int8 tensors are not the conv weights"
    float_4d = [tuple(t.shape) for t in stored if t.is_floating_point() and t.dim() == 4]
    assert not float_4d, f"float conv weights still stored: {float_4d}"


def test_bf16_file_is_bf16_inside_float32_outside(files: dict[str, Path]) -> None:
    program = load_program(files["bf16"])
    floats = {k: t.dtype for k, t in [*program.state_dict.items(), *program.constants.items()]
              if t.is_floating_point()}
    assert floats and set(floats.values()) == {torch.bfloat16}, floats
    user_inputs = [n for n in program.graph.nodes if n.op == "placeholder"
                   and n.name in program.graph_signature.user_inputs]
    dtypes = [n.meta["val"].dtype for n in user_inputs]
    assert dtypes == [torch.float32, torch.float32], dtypes


@pytest.mark.slow
def test_programs_run_under_torch_compile(student: nn.Module, files: dict[str, Path]) -> None:
    """Inductor lowers the int8 program's plain convs to oneDNN int8 convolutions."""
    mel, face = image_like(7, torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = student(mel, face)
    counters.clear()
    int8 = compile_program(load_program(files["int8"]))(mel, face)
    lowered = counters["inductor"]["qconv_weight_prepack_matcher_count"]
    assert lowered == N_CONVS - N_TRANSPOSED, f"{lowered} convs lowered to int8 kernels"
    bf16 = compile_program(load_program(files["bf16"]))(mel, face)
    for kind, out, floor in (("int8", int8, INT8_MIN_PSNR_DB), ("bf16", bf16, BF16_MIN_PSNR_DB)):
        assert out.shape == (7, 3, 96, 96) and out.dtype == torch.float32, (kind, out.dtype)
        quality = psnr(out, reference)
        assert quality >= floor, f"compiled {kind}: {quality:.2f} dB vs float student"
