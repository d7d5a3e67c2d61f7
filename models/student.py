"""Build students from presets, and save and load them as self-describing checkpoints.

A student checkpoint (``student.pt``) is ``{"format", "spec", "state_dict"}``: the spec as plain
data next to the weights, so :func:`load_student` rebuilds the network with nothing but this
package's ``models`` and torch (no Hydra, no Lightning, no config) and reads the file with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from models.spec import StudentSpec
from models.wav2lip import Wav2Lip

__all__ = ["STUDENT_FORMAT", "build_student", "load_student", "save_student"]

log = logging.getLogger(__name__)

STUDENT_FORMAT = "wav2lip-student/1"


def build_student(**spec: Any) -> Wav2Lip:
    """Hydra factory for ``conf/student/*.yaml``: the keyword arguments are a :class:`StudentSpec`.

    Example: ``build_student(name="nota_like", slim=0.25, face_residuals=[0] * 6, ...)``.
    """
    return Wav2Lip(spec=StudentSpec(**spec))


def save_student(model: Wav2Lip, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s spec and float32 CPU weights to ``path`` atomically; returns the path."""
    path = Path(path)
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    payload = {"format": STUDENT_FORMAT, "spec": model.spec.to_dict(), "state_dict": state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    log.info("saved student <%s> to %s", model.spec.name, path)
    return path


def load_student(path: str | os.PathLike[str], map_location: str = "cpu") -> Wav2Lip:
    """Rebuild a student saved by :func:`save_student`, in eval mode.

    Raises:
        ValueError: If the file is not a student checkpoint or its weights do not fit its spec.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"student checkpoint {path} does not exist; check the path")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != STUDENT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a student checkpoint (format {found!r}, expected "
                         f"{STUDENT_FORMAT!r}); write one with models.student.save_student")
    model = Wav2Lip(spec=StudentSpec.from_dict(payload["spec"]))
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the stored spec ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected keys, first {(missing + unexpected)[:1]})")
    return model.eval()
