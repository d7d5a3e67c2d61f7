"""The models an evaluation compares: generators from checkpoints, and exported programs.

Each becomes a :class:`Candidate`: a callable on 4-D inputs plus its size where it can be known.
Checkpoints (``student.pt``, a Lightning ``.ckpt`` with ``student_spec``, a released-format
``.pth``) load as :class:`~models.wav2lip.Wav2Lip` and are sized by :mod:`compress.complexity`.
A ``.pt2`` program is sized from its own graph: the stored tensors behind its conv weights and
biases, and the convolutions it runs on one frame. An ``.onnx`` file runs in ONNX Runtime, with
its two inputs taken by position (mel, face) and its size unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.export import ExportedProgram
from torch.utils._python_dispatch import TorchDispatchMode

from compress.complexity import count_macs, count_parameters
from data.dataset import IMG_SIZE
from models.checkpoint import check_state_dict, load_weights
from models.spec import StudentSpec
from models.student import STUDENT_FORMAT, load_student
from models.wav2lip import Wav2Lip

__all__ = [
    "Candidate",
    "EvalError",
    "check_file",
    "load_candidates",
    "load_generator",
    "load_program_candidate",
    "model_entries",
    "program_macs",
    "program_parameters",
]

PROGRAM_SUFFIXES = (".pt2", ".onnx")
_CONV_OPS = (
    torch.ops.aten.convolution,
    torch.ops.aten._convolution,
    torch.ops.aten.convolution_overrideable,
)
# The conv ops of an exported Wav2Lip graph, before dispatch decomposes them into _CONV_OPS.
_CONV_TARGETS = (torch.ops.aten.conv2d.default, torch.ops.aten.conv_transpose2d.input)
_ONNX_INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger"}

Runner = Callable[[Tensor, Tensor], Tensor]


class EvalError(ValueError):
    """Evaluation input that cannot work; the one-line message names the value and the fix."""


@dataclass
class Candidate:
    """One model to evaluate: a runner on 4-D inputs and what is known of its size.

    ``run(mel, face)`` takes mel (N, 1, 80, 16) and face (N, 6, 96, 96) and returns
    (N, 3, 96, 96) frames in [0, 1]. ``macs`` has the keys of
    :func:`compress.complexity.count_macs` (at least the two totals), or is None when unknown.
    """

    name: str
    kind: str
    run: Runner
    parameters: int | None = None
    macs: dict[str, int] | None = None
    is_teacher: bool = False


def load_generator(path: str | Path, flag: str = "--student") -> tuple[Wav2Lip, str]:
    """Load a Wav2Lip generator from any checkpoint this project reads, in eval mode.

    Accepts a ``student.pt`` (:func:`models.student.save_student`), a Lightning ``.ckpt`` holding
    ``student_spec`` (the student's weights are taken from it), or a released-format or bare
    state dict of the full architecture (``wav2lip.pth``).

    Returns:
        The model and a short description for the table (``student <preset>``, ``generator``).

    Raises:
        EvalError: One line naming ``flag``, the file and the fix.
    """
    path = Path(path)
    check_file(path, flag)
    try:
        # Zip-format files map lazily, so peeking at the payload costs little. Legacy (torch 1.1)
        # files, such as the released ones, cannot be mapped: load_weights reads those.
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure here is reported by load_weights below
        payload = None
    try:
        if isinstance(payload, dict) and payload.get("format") == STUDENT_FORMAT:
            model = load_student(path)
            kind = f"student {model.spec.name}"
        elif isinstance(payload, dict) and "student_spec" in payload:
            model = _from_lightning(payload, path)
            kind = f"student {model.spec.name} (ckpt)"
        else:
            model, kind = load_weights(Wav2Lip(), path), "generator"
    except ValueError as err:  # CheckpointError and load_student's errors, all one line
        raise EvalError(f"{flag}: {err}") from None
    return model.eval().requires_grad_(False), kind


def _from_lightning(payload: dict, path: Path) -> Wav2Lip:
    spec = StudentSpec.from_dict(payload["student_spec"])
    state = {k.removeprefix("student."): v for k, v in payload.get("state_dict", {}).items()
             if k.startswith("student.")}
    model = Wav2Lip(spec=spec)
    check_state_dict(state, model, str(path))
    model.load_state_dict(state)
    return model


def load_program_candidate(path: str | Path, name: str, threads: int) -> Candidate:
    """A candidate for an exported program: ``.pt2`` (torch.export, fp32 or int8) or ``.onnx``.

    Raises:
        EvalError: The file is missing, of another type, or cannot be loaded.
    """
    path = Path(path)
    check_file(path, "--program")
    if path.suffix == ".onnx":
        return _onnx_candidate(path, name, threads)
    # Imported here: torchao (pulled in by compress.quantize) is only needed for programs.
    from compress.quantize import load_program

    try:
        program = load_program(path)
    except Exception as err:  # noqa: BLE001 - torch raises many types for foreign files
        raise EvalError(f"--program {path} cannot be loaded as a torch.export program "
                        f"({type(err).__name__}); give a .pt2 written by "
                        f"compress.quantize.save_program") from None
    int8 = any("quantize_per" in str(n.target) for n in program.graph.nodes)
    module = program.module()
    return Candidate(name, f"pt2 {'int8' if int8 else 'fp32'}", module,
                     program_parameters(program), program_macs(module))


def _onnx_candidate(path: Path, name: str, threads: int) -> Candidate:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    except Exception as err:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        raise EvalError(f"--program {path} cannot be opened by ONNX Runtime "
                        f"({type(err).__name__}); give an ONNX export of a generator") from None
    inputs = session.get_inputs()
    if len(inputs) != 2:
        raise EvalError(f"--program {path} has {len(inputs)} inputs; a generator takes two "
                        f"(mel, face)")
    # Inputs by position, (mel, face), unless the shapes say the face comes first.
    if inputs[0].shape[1:2] == [6]:
        inputs = inputs[::-1]
    names = [i.name for i in inputs]
    fixed = inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else None

    def run(mel: Tensor, face: Tensor) -> Tensor:
        step = fixed or mel.shape[0]
        outs = []
        for begin in range(0, mel.shape[0], step):
            m, f = mel[begin:begin + step], face[begin:begin + step]
            n = m.shape[0]
            if n < step:  # a fixed-batch export: pad the tail with copies of its last sample
                m, f = (torch.cat([t, t[-1:].expand(step - n, *t.shape[1:])]) for t in (m, f))
            out = session.run(None, {names[0]: m.numpy(), names[1]: f.numpy()})[0]
            outs.append(torch.from_numpy(out[:n]))
        return torch.cat(outs)

    int8 = bool(ops & _ONNX_INT8_OPS)
    return Candidate(name, f"onnx {'int8' if int8 else 'fp32'}", run)


def check_file(path: Path, flag: str) -> None:
    """Raise :class:`EvalError` unless ``path`` is an existing file that ``flag`` can take.

    ``--program`` takes ``.pt2`` and ``.onnx`` files, and the other options anything else.
    """
    if not path.is_file():
        raise EvalError(f"{flag} {path} does not exist; check the path")
    if flag == "--program" and path.suffix not in PROGRAM_SUFFIXES:
        raise EvalError(f"--program {path} is not an exported program: give a .pt2 "
                        f"(compress.quantize.save_program) or .onnx file; pass checkpoints "
                        f"with --student or --teacher")
    if flag != "--program" and path.suffix in PROGRAM_SUFFIXES:
        raise EvalError(f"{flag} {path} is an exported program; pass it with --program")


def program_parameters(program: ExportedProgram) -> int:
    """Elements of the stored tensors a program's conv weights and biases are computed from.

    Each conv operand is followed back through its first input (dequantize, a transposed
    conv's permute) to the stored tensor, so int8 weights count once, and scales not at all.
    """
    sig = program.graph_signature
    sources = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
               **sig.inputs_to_lifted_tensor_constants}
    stored = {**program.state_dict, **program.constants}
    seen: set[str] = set()
    total = 0
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in _CONV_TARGETS:
            continue
        for arg in node.args[1:3]:
            while isinstance(arg, torch.fx.Node) and arg.op == "call_function":
                arg = arg.args[0]
            if isinstance(arg, torch.fx.Node) and arg.name in sources and arg.name not in seen:
                seen.add(arg.name)
                total += stored[sources[arg.name]].numel()
    return total


class _ConvShapes(TorchDispatchMode):
    """Records (input, weight, transposed, output) shapes of every convolution that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Size, torch.Size, bool, torch.Size]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in _CONV_OPS:
            self.calls.append((args[0].shape, args[1].shape, bool(args[6]), out.shape))
        return out


@torch.no_grad()
def program_macs(run: Runner) -> dict[str, int]:
    """Convolution MACs of one frame for any callable generator, e.g. a program's module.

    Gives the two totals of :func:`compress.complexity.count_macs` from the shapes of the
    convolutions that actually run, so it needs no ``nn.ConvTranspose2d`` modules.
    """
    recorder = _ConvShapes()
    with recorder:
        run(torch.zeros(1, 1, 80, 16), torch.zeros(1, 6, IMG_SIZE, IMG_SIZE))
    by_input = by_output = 0
    for x, weight, transposed, out in recorder.calls:
        # A conv's weight numel is the MACs per output position; a transposed conv's, per input.
        per_position = weight.numel()
        by_output += out[2:].numel() * per_position
        by_input += (x[2:] if transposed else out[2:]).numel() * per_position
    return {"macs_convt_input": by_input, "macs_convt_output": by_output}


def _labels(paths: Sequence[Path]) -> list[str]:
    """Each file's shortest path suffix that no other file shares (``a/student.pt``, ...)."""
    parts = [p.resolve().parts for p in paths]
    labels = []
    for i, mine in enumerate(parts):
        others = [q for j, q in enumerate(parts) if j != i]
        depth = next((d for d in range(1, len(mine) + 1)
                      if all(q[-d:] != mine[-d:] for q in others)), len(mine))
        labels.append("/".join(mine[-depth:]))
    return labels


def model_entries(
    teacher: str | Path | None, students: Sequence[str | Path], programs: Sequence[str | Path]
) -> list[tuple[str, Path]]:
    """(flag, path) of every model named, teacher first, after cheap checks of each path."""
    entries = ([("--teacher", Path(teacher))] if teacher else []) \
        + [("--student", Path(p)) for p in students] + [("--program", Path(p)) for p in programs]
    if not entries:
        raise EvalError("no model to evaluate; give --teacher, --student or --program")
    resolved = [p.resolve() for _, p in entries]
    twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if twice:
        raise EvalError(f"{twice[0]} is given twice; name each model once")
    for flag, path in entries:  # fail on a bad path before loading any large file
        check_file(path, flag)
    return entries


def load_candidates(entries: Sequence[tuple[str, Path]], threads: int) -> list[Candidate]:
    """Load the models of :func:`model_entries`, in order; the teacher is marked."""
    candidates = []
    for (flag, path), name in zip(entries, _labels([p for _, p in entries])):
        if flag == "--program":
            candidates.append(load_program_candidate(path, name, threads))
            continue
        model, kind = load_generator(path, flag)
        macs = count_macs(model)
        candidates.append(Candidate(name, "teacher" if flag == "--teacher" else kind, model,
                                    count_parameters(model), macs, flag == "--teacher"))
    return candidates
