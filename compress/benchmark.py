"""Throughput of the teacher and of student presets on this CPU, per deployable backend.

One run measures, with one fixed thread count for PyTorch and ONNX Runtime:

- ``teacher``: the original Wav2Lip in fp32 eager mode, BatchNorm unfolded: how it runs today.
- each student preset (``conf/student/*.yaml``) as its inference network
  (:func:`compress.fold.fuse_for_inference`: BatchNorm folded, ReLU fused where exact) under:

  - ``eager_fp32``: plain PyTorch.
  - ``compile_bf16``: the bf16 program of :func:`compress.exports.export_bf16` (bf16 weights,
    float32 in and out) under :func:`compress.exports.compile_program` (Inductor, freezing).
    bf16 weights rather than fp32 weights under ``torch.autocast``: with freezing both ran at the
    same speed within noise (nota_like, batch 128, 1 thread: 697-728 against 713-719 frames per
    CPU second), and the bf16 file is half the size. ``bf16_mode="autocast"`` measures the other.
  - ``compile_int8``: the PT2E int8 program of :func:`compress.quantize.quantize_int8` under
    ``compile_program``, whose freezing lowers every plain conv to oneDNN's int8 ``qconv`` (with
    torchao's x86 passes). Inductor has no int8 transposed conv: the decoder's transposed convs
    run in float on dequantized weights.
  - ``ort_fp32`` / ``ort_int8``: ONNX Runtime's CPU provider on the files of
    :mod:`compress.onnx_export` (int8: static QDQ, per-channel weights).

With ``bound`` (the default) one more model runs last, ``width1``: Wav2Lip's layer geometry with
one channel in every layer and no residual layers. It computes nothing useful; it is the
fastest network any preset (widths and residual counts) can be, so its frames/s bound what a
preset can reach on this machine and backend.

A student backend runs a batch larger than ``chunk`` frames (default 64) as consecutive calls
of at most ``chunk`` frames and concatenates the outputs (:func:`run_in_chunks`), as a deployment
would: the small students' activations at 96 and 48 px stay in cache that way (nota_like,
compile_bf16, 2 threads: 1,930 frames/s in one call of 128, 2,466 in calls of 64). The teacher
always runs a batch in one call, as Wav2Lip does.

Weights are random (BatchNorm statistics set from one batch of image-like inputs, so activations
have realistic ranges): speed does not depend on what the weights have learnt. Frames per second
is ``batch / median time of one call`` after warm-up; repeats stop at a time budget. Each
backend's artifact (state dict, ``.pt2`` program or ``.onnx`` file) is written and its size
reported. A backend that fails for a preset is recorded as failed with a one-line reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import ExportedProgram

from compress.complexity import PRESET_DIR, count_macs, count_parameters, preset_names
from compress.fold import fuse_for_inference

__all__ = [
    "BACKENDS",
    "Backend",
    "BenchmarkConfig",
    "Bf16Mode",
    "Measurement",
    "default_output_dir",
    "format_table",
    "image_like",
    "load_preset",
    "plot_throughput",
    "run_benchmark",
    "run_in_chunks",
    "usable_cores",
]

log = logging.getLogger(__name__)


class Backend(StrEnum):
    """How a student runs; the teacher always runs as ``EAGER_FP32`` with BatchNorm unfolded."""

    EAGER_FP32 = "eager_fp32"
    COMPILE_BF16 = "compile_bf16"
    COMPILE_INT8 = "compile_int8"
    ORT_FP32 = "ort_fp32"
    ORT_INT8 = "ort_int8"


class Bf16Mode(StrEnum):
    """How ``compile_bf16`` gets to bf16: cast weights, or fp32 weights under autocast."""

    WEIGHTS = "weights"
    AUTOCAST = "autocast"


BACKENDS = tuple(b.value for b in Backend)
BF16_MODES = tuple(m.value for m in Bf16Mode)
TEACHER = "teacher"
# One channel per layer, no residual layers: the speed limit of Wav2Lip's layer geometry.
BOUND = "width1"
# The teacher's own architecture as a preset: the teacher row already measures it.
SKIPPED_PRESETS = ("full",)
_CALIBRATION_SAMPLES = 8


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to measure and how long to spend on it.

    Args:
        presets: Student presets (``conf/student`` names); empty: all but ``full``.
        backends: Student backends (:class:`Backend` or its values); the teacher is fp32 eager.
        batches: Batch sizes; frames/s are compared with the teacher's at the same batch.
        threads: Threads for PyTorch and ONNX Runtime (intra-op); ``None``: all usable cores.
        budget_s: Time budget of the timed repeats of one measurement (after warm-up).
        min_repeats: Timed calls at least, even past the budget.
        max_repeats: Timed calls at most.
        warmup: Untimed calls first, at least one: compiling backends compile in the first.
        bf16_mode: How ``compile_bf16`` gets to bf16 (:class:`Bf16Mode` or its value).
        output_dir: Where results and artifacts go.
        seed: Seed for weights and inputs.
        bound: Also measure ``width1``, the one-channel network that bounds every preset.
        chunk: Student backends run larger batches in calls of at most this many frames;
            ``None``: one call per batch.
    """

    presets: tuple[str, ...] = ()
    backends: tuple[Backend, ...] = tuple(Backend)
    batches: tuple[int, ...] = (1, 128)
    threads: int | None = None
    budget_s: float = 3.0
    min_repeats: int = 3
    max_repeats: int = 20
    warmup: int = 1
    bf16_mode: Bf16Mode = Bf16Mode.WEIGHTS
    output_dir: Path = field(default_factory=lambda: default_output_dir())
    seed: int = 0
    bound: bool = True
    chunk: int | None = 64

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
        if self.bf16_mode not in BF16_MODES:
            raise ValueError(f"bf16_mode {self.bf16_mode!r} must be one of {list(BF16_MODES)}")
        set_ = object.__setattr__
        set_(self, "backends", tuple(Backend(b) for b in self.backends))
        set_(self, "bf16_mode", Bf16Mode(self.bf16_mode))
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"batches {list(self.batches)} must be positive integers")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"chunk {self.chunk} must be a positive number of frames, or None "
                             "(on the command line 0) for one call per batch")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.min_repeats < 1 or self.max_repeats < self.min_repeats or self.warmup < 1:
            raise ValueError(f"need 1 <= min_repeats <= max_repeats and warmup >= 1, got "
                             f"{self.min_repeats}, {self.max_repeats}, {self.warmup}")
        available = preset_names()
        missing = [p for p in self.presets if p not in available]
        if missing:
            raise ValueError(f"no student preset {missing} in {PRESET_DIR}; choose from "
                             f"{available}")
        set_(self, "output_dir", Path(self.output_dir))
        if not self.presets:
            set_(self, "presets", tuple(p for p in available if p not in SKIPPED_PRESETS))


@dataclass
class Measurement:
    """One model, backend and batch size: throughput, or why it could not be measured.

    ``seconds`` holds each timed call; ``prepare_s`` the backend's preparation (export,
    quantization, artifact), shared by its batch sizes; ``warmup_s`` the untimed first calls,
    where ``torch.compile`` compiles.
    """

    model: str
    backend: str
    batch: int
    fps: float | None = None
    seconds: list[float] = field(default_factory=list)
    prepare_s: float | None = None
    warmup_s: float | None = None
    ratio_to_teacher: float | None = None
    error: str | None = None


def default_output_dir() -> Path:
    """``outputs/benchmark/<time>`` under the current directory, like Hydra's run folders."""
    return Path("outputs") / "benchmark" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def load_preset(name: str) -> nn.Module:
    """Build the student of ``conf/student/<name>.yaml`` with fresh random weights."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no student preset {name!r} in {PRESET_DIR}; choose from "
                         f"{preset_names()}")
    return instantiate(OmegaConf.load(path))


def image_like(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mels in [-4, 4] and smooth faces in [0, 1] with the target half masked, as at inference."""
    mel = torch.rand(n, 1, 80, 16, generator=generator) * 8 - 4
    coarse = torch.rand(n, 6, 12, 12, generator=generator)
    face = F.interpolate(coarse, size=96, mode="bilinear", align_corners=False)
    face[:, :3, 48:] = 0
    return mel, face


@torch.no_grad()
def _set_batchnorm_statistics(model: nn.Module, inputs: tuple[Tensor, Tensor]) -> nn.Module:
    # Default statistics (mean 0, var 1) shrink random activations layer by layer towards
    # denormal floats, which are slow on x86; statistics of its own activations keep each
    # layer's output at unit scale, as in a trained network.
    saved = {bn: bn.momentum for bn in model.modules() if isinstance(bn, nn.BatchNorm2d)}
    for bn in saved:
        bn.momentum = None
    model.train()
    model(*inputs)
    for bn, momentum in saved.items():
        bn.momentum = momentum
    return model.eval()


def run_in_chunks(forward: Callable[[Any, Any], Any], audio: Any, face: Any, chunk: int | None,
                  concatenate: Callable[[list[Any]], Any] = torch.cat) -> Any:
    """``forward(audio, face)`` on consecutive slices of at most ``chunk`` frames, concatenated.

    ``audio`` and ``face`` are anything sliceable along the batch (tensors, NumPy arrays);
    ``chunk=None`` or a batch no larger than it is one call.
    """
    batch = len(face)
    if chunk is None or batch <= chunk:
        return forward(audio, face)
    return concatenate([forward(audio[i:i + chunk], face[i:i + chunk])
                        for i in range(0, batch, chunk)])


class _Runner:
    """A prepared backend: ``run(batch)`` runs the model on prepared inputs of that size."""

    def __init__(self, forward: Callable[[Any, Any], Any], artifact: Path | None, seed: int,
                 chunk: int | None, numpy: bool = False) -> None:
        self.artifact = artifact
        self._forward = forward
        self._chunk = chunk
        self._numpy = numpy
        self._seed = seed
        self._inputs: dict[int, tuple[Any, Any]] = {}

    def run(self, batch: int) -> Any:
        if batch not in self._inputs:
            audio, face = image_like(batch, torch.Generator().manual_seed(self._seed + batch))
            self._inputs[batch] = (audio.numpy(), face.numpy()) if self._numpy else (audio, face)
        concatenate = np.concatenate if self._numpy else torch.cat
        return run_in_chunks(self._forward, *self._inputs[batch], self._chunk, concatenate)


def _eager(model: nn.Module, path: Path, seed: int, chunk: int | None) -> _Runner:
    torch.save(model.state_dict(), path)
    return _Runner(model, path, seed, chunk)


def _compiled(program: ExportedProgram, autocast: bool) -> Callable[[Tensor, Tensor], Tensor]:
    from compress.exports import compile_program

    # A fresh Dynamo state per program: recompilations accumulate across models otherwise, and
    # past Dynamo's limit a model would silently run eagerly.
    torch._dynamo.reset()
    run = compile_program(program)

    def forward(audio: Tensor, face: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return run(audio, face)

    return forward


def _compile_bf16(model: nn.Module, path: Path, seed: int, chunk: int | None,
                  mode: Bf16Mode) -> _Runner:
    from compress.exports import export_bf16
    from compress.quantize import export_float, save_program

    example = image_like(2, torch.Generator().manual_seed(seed))
    weights = mode is Bf16Mode.WEIGHTS
    program = export_bf16(model, example) if weights else export_float(model, example)
    save_program(program, path)
    return _Runner(_compiled(program, autocast=not weights), path, seed, chunk)


def _compile_int8(model: nn.Module, path: Path, seed: int, chunk: int | None) -> _Runner:
    # Importing the x86 quantizer registers torchao's Inductor lowering passes for int8 convs.
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

    from compress.quantize import quantize_int8, save_program

    calibration = [image_like(_CALIBRATION_SAMPLES, torch.Generator().manual_seed(seed + 1))]
    program = quantize_int8(model, calibration)
    save_program(program, path)
    return _Runner(_compiled(program, autocast=False), path, seed, chunk)


def _onnx_runtime(
    model: nn.Module, path: Path, seed: int, chunk: int | None, threads: int, int8: bool
) -> _Runner:
    import onnxruntime as ort

    from compress.onnx_export import INPUT_NAMES, export_onnx, quantize_onnx_int8

    example = image_like(2, torch.Generator().manual_seed(seed))
    fp32_path = path.with_name(path.name.replace("_int8", "_fp32"))
    if not fp32_path.is_file():
        export_onnx(model, example, fp32_path)
    if int8:
        calibration = [image_like(_CALIBRATION_SAMPLES, torch.Generator().manual_seed(seed + 1))]
        quantize_onnx_int8(fp32_path, calibration, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(audio: np.ndarray, face: np.ndarray) -> np.ndarray:
        return session.run(None, dict(zip(INPUT_NAMES, (audio, face))))[0]

    return _Runner(forward, path, seed, chunk, numpy=True)


def _prepare(
    backend: Backend, model: nn.Module, folder: Path, stem: str, cfg: BenchmarkConfig,
    threads: int,
) -> _Runner:
    # The teacher runs as Wav2Lip does: each batch in one call.
    chunk = None if stem == TEACHER else cfg.chunk
    if backend is Backend.EAGER_FP32:
        return _eager(model, folder / f"{stem}_fp32.pt", cfg.seed, chunk)
    if backend is Backend.COMPILE_BF16:
        return _compile_bf16(model, folder / f"{stem}_bf16.pt2", cfg.seed, chunk, cfg.bf16_mode)
    if backend is Backend.COMPILE_INT8:
        return _compile_int8(model, folder / f"{stem}_int8.pt2", cfg.seed, chunk)
    int8 = backend is Backend.ORT_INT8
    path = folder / f"{stem}_{'int8' if int8 else 'fp32'}.onnx"
    return _onnx_runtime(model, path, cfg.seed, chunk, threads, int8)


def _time(runner: _Runner, batch: int, cfg: BenchmarkConfig) -> tuple[float, list[float]]:
    """Seconds of the warm-up calls (compiling backends compile here), and of each timed call."""
    with torch.no_grad():
        tic = time.perf_counter()
        for _ in range(cfg.warmup):
            runner.run(batch)
        warmup = time.perf_counter() - tic
        seconds: list[float] = []
        start = time.perf_counter()
        while len(seconds) < cfg.max_repeats and (
            len(seconds) < cfg.min_repeats or time.perf_counter() - start < cfg.budget_s
        ):
            tic = time.perf_counter()
            runner.run(batch)
            seconds.append(time.perf_counter() - tic)
    return warmup, seconds


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first}"[:160]


def _measure_model(
    name: str, model: nn.Module, backends: Sequence[Backend], cfg: BenchmarkConfig, threads: int,
    folder: Path,
) -> tuple[list[Measurement], dict[str, int]]:
    """Prepare each backend once, then time it at every batch size."""
    results: list[Measurement] = []
    sizes: dict[str, int] = {}
    for backend in backends:
        tic = time.perf_counter()
        try:
            runner = _prepare(backend, model, folder, name, cfg, threads)
        except Exception as err:  # noqa: BLE001 - one backend failing must not end the run
            log.warning("%s / %s: preparation failed: %s", name, backend, err)
            results += [Measurement(name, backend, b, error=_one_line(err)) for b in cfg.batches]
            continue
        prepared = time.perf_counter() - tic
        if runner.artifact is not None and runner.artifact.is_file():
            sizes[backend] = runner.artifact.stat().st_size
        for batch in cfg.batches:
            tic = time.perf_counter()
            try:
                warmup, seconds = _time(runner, batch, cfg)
            except Exception as err:  # noqa: BLE001
                log.warning("%s / %s / batch %d failed: %s", name, backend, batch, err)
                results.append(Measurement(name, backend, batch, error=_one_line(err)))
                continue
            fps = batch / statistics.median(seconds)
            results.append(Measurement(name, backend, batch, fps=fps, seconds=seconds,
                                       prepare_s=prepared, warmup_s=warmup))
            log.info("%-12s %-13s batch %4d: %9.1f frames/s (%d repeats; warm-up %.1f s, "
                     "all %.1f s)", name, backend, batch, fps, len(seconds), warmup,
                     time.perf_counter() - tic)
    return results, sizes


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Measure the teacher and every preset/backend pair; write JSON, markdown and PNG.

    Returns:
        The report written to ``results.json`` (see :func:`format_table` for its rows).
    """
    threads = cfg.threads or usable_cores()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(cfg, threads)
    finally:
        # The caller's thread count: kernels may pick another reduction order with another count.
        torch.set_num_threads(previous_threads)


def _run(cfg: BenchmarkConfig, threads: int) -> dict[str, Any]:
    folder = cfg.output_dir
    artifacts = folder / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_start = os.getloadavg()
    log.info("threads: %d (torch.set_num_threads and ORT intra-op); load average %.2f",
             threads, load_start[0])

    models: dict[str, dict[str, Any]] = {}
    measurements: list[Measurement] = []
    timings: dict[str, float] = {}
    for name in (TEACHER, *cfg.presets, *((BOUND,) if cfg.bound else ())):
        tic = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = {TEACHER: _wav2lip_teacher, BOUND: _width1_bound}.get(
            name, lambda: load_preset(name))()
        model = _set_batchnorm_statistics(
            model, image_like(_CALIBRATION_SAMPLES, torch.Generator().manual_seed(cfg.seed))
        )
        macs = count_macs(model)
        models[name] = {
            "parameters": count_parameters(model),
            "macs_convt_output": macs["macs_convt_output"],
            "macs_convt_input": macs["macs_convt_input"],
            "artifact_bytes": {},
        }
        if name == TEACHER:
            # How Wav2Lip runs today: unfolded BatchNorm, fp32, eager.
            backends, deployed = (Backend.EAGER_FP32,), model
        else:
            backends, deployed = cfg.backends, fuse_for_inference(model)
        rows, sizes = _measure_model(name, deployed, backends, cfg, threads, artifacts)
        models[name]["artifact_bytes"] = sizes
        measurements += rows
        timings[name] = time.perf_counter() - tic
        log.info("%s done in %.1f s", name, timings[name])

    teacher_fps = {m.batch: m.fps for m in measurements if m.model == TEACHER and m.fps}
    for m in measurements:
        if m.fps is not None and teacher_fps.get(m.batch):
            m.ratio_to_teacher = m.fps / teacher_fps[m.batch]

    report = {
        "note": "random weights (speed only); BatchNorm folded for every student backend; "
                "the teacher runs unfolded in fp32 eager mode",
        "machine": _machine(threads),
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "bf16_mode": cfg.bf16_mode,
        "teacher_fps": teacher_fps,
        "models": models,
        "measurements": [asdict(m) for m in measurements],
        "seconds": {"per_model": timings, "total": time.perf_counter() - started},
    }
    _write_text(folder / "results.json", json.dumps(report, indent=2, default=_json_default))
    _write_text(folder / "results.md", format_table(report))
    plot_throughput(report, folder / "throughput.png")
    log.info("benchmark took %.0f s; results in %s", report["seconds"]["total"], folder)
    return report


def _wav2lip_teacher() -> nn.Module:
    from models.wav2lip import Wav2Lip

    return Wav2Lip()


def _width1_bound() -> nn.Module:
    from models.spec import AUDIO_RESIDUALS, DECODER_RESIDUALS, FACE_RESIDUALS, StudentSpec
    from models.wav2lip import Wav2Lip

    spec = StudentSpec(face=(1,) * 7, audio=(1,) * 5, decoder=(1,) * 7, head=1,
                       face_residuals=(0,) * len(FACE_RESIDUALS),
                       audio_residuals=(0,) * len(AUDIO_RESIDUALS),
                       decoder_residuals=(0,) * len(DECODER_RESIDUALS), name=BOUND)
    return Wav2Lip(spec=spec)


def _machine(threads: int) -> dict[str, Any]:
    import onnxruntime

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": usable_cores(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cell(m: Measurement | None) -> tuple[str, str]:
    if m is None:
        return "-", "-"
    if m.fps is None:
        return f"failed: {m.error}", "-"
    ratio = f"{m.ratio_to_teacher:.1f}x" if m.ratio_to_teacher is not None else "-"
    return f"{m.fps:,.1f}", ratio


def format_table(report: dict[str, Any]) -> str:
    """Markdown table: one row per model and backend, frames/s and ratio per batch size."""
    batches = report["config"]["batches"]
    rows = [Measurement(**m) for m in report["measurements"]]
    index = {(m.model, m.backend, m.batch): m for m in rows}
    header = ["model", "backend", "params", "GMACs convT-out", "GMACs convT-in", "file MB"]
    for b in batches:
        header += [f"frames/s @{b}", f"x teacher @{b}"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    seen: list[tuple[str, str]] = []
    for m in rows:
        if (m.model, m.backend) not in seen:
            seen.append((m.model, m.backend))
    for model, backend in seen:
        info = report["models"][model]
        size = info["artifact_bytes"].get(backend)
        cells = [model, backend, f"{info['parameters']:,}",
                 f"{info['macs_convt_output'] / 1e9:.3f}", f"{info['macs_convt_input'] / 1e9:.3f}",
                 f"{size / 1e6:.2f}" if size else "-"]
        for b in batches:
            cells += list(_cell(index.get((model, backend, b))))
        lines.append("| " + " | ".join(cells) + " |")
    machine = report["machine"]
    load = report["load_average"]
    lines += [
        "",
        f"{machine['cpu']}, {machine['threads']} threads (of {machine['cores']} cores), "
        f"torch {machine['torch']}, onnxruntime {machine['onnxruntime']}; load average "
        f"{load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end; "
        f"{report['seconds']['total']:.0f} s in all.",
        f"frames/s = batch / median call time; x teacher: against the teacher's fp32 eager "
        f"frames/s at the same batch in this run. {_chunk_note(report['config'].get('chunk'))}"
        f"compile_bf16: bf16 {report['bf16_mode']}. "
        "MACs per 96x96 frame, convolutions only; convT-out counts transposed convs by output "
        "positions (thop), convT-in by input positions. " + report["note"] + ".",
    ]
    if BOUND in report["models"]:
        lines.append(f"{BOUND}: one channel per layer, no residual layers; not a usable model, "
                     "but no preset of widths and residual counts can run faster.")
    return "\n".join(lines) + "\n"


def _chunk_note(chunk: int | None) -> str:
    if chunk is None:
        return "Every model runs a batch in one call. "
    return (f"Students run a batch in calls of at most {chunk} frames (outputs concatenated); "
            "the teacher in one call. ")


def plot_throughput(report: dict[str, Any], path: Path) -> Path:
    """Frames/s at the largest batch against MACs (convT by input), log axes; written atomically.

    One marker shape per backend; each model is labelled once, at its fastest backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = max(report["config"]["batches"])
    rows = [m for m in report["measurements"] if m["batch"] == batch and m["fps"]]
    markers = dict(zip(BACKENDS, "osD^v"))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for backend in BACKENDS:
        points = [(report["models"][m["model"]]["macs_convt_input"] / 1e9, m["fps"])
                  for m in rows if m["backend"] == backend]
        if points:
            xs, ys = zip(*points)
            label = backend if backend != "eager_fp32" else "eager_fp32 (teacher: unfolded)"
            ax.scatter(xs, ys, marker=markers[backend], label=label, alpha=0.8)
    best: dict[str, tuple[float, float]] = {}
    for m in rows:
        x = report["models"][m["model"]]["macs_convt_input"] / 1e9
        if m["model"] not in best or m["fps"] > best[m["model"]][1]:
            best[m["model"]] = (x, m["fps"])
    for name, (x, y) in best.items():
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GMACs per 96x96 frame (transposed convs by input positions)")
    ax.set_ylabel(f"frames/s at batch {batch}")
    threads = report["machine"]["threads"]
    ax.set_title(f"Wav2Lip teacher and students, {threads} threads")
    ax.grid(True, which="both", alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
