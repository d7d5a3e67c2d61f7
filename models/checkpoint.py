"""Reading released Wav2Lip-family checkpoints, with one-line errors for every way they go wrong.

The released files (``wav2lip.pth``, ``wav2lip_gan.pth``, ``lipsync_expert.pth``) were written by
torch 1.1 in the legacy (non-zip) format as ``{"state_dict", "optimizer", "global_step",
"global_epoch"}``, sometimes with DataParallel's ``module.`` key prefix. ``torch.load`` reads that
format with ``weights_only=True``, so no pickled code is ever executed.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Released sizes, quoted in errors so a truncated download is easy to recognise.
RELEASED_BYTES = {"wav2lip.pth": 435_807_851, "wav2lip_gan.pth": 435_801_865}

# A key that only one released family has, to name what a wrong file holds. The generator and
# the discriminator share `face_encoder_blocks.*` names, and the generator and the expert share
# `audio_encoder.*`, so key overlap alone would report "mismatch" rather than "wrong file".
FAMILIES: dict[str, tuple[str, str, str]] = {
    # kind: (distinctive key prefix, description, released file)
    "Wav2Lip": ("face_decoder_blocks.", "Wav2Lip generator", "wav2lip.pth or wav2lip_gan.pth"),
    "SyncNet": ("face_encoder.", "SyncNet expert", "lipsync_expert.pth"),
    "visual-quality discriminator": (
        "binary_pred.", "visual-quality discriminator", "visual_quality_disc.pth"
    ),
}


class CheckpointError(ValueError):
    """A checkpoint file cannot be used for the model it was given to; the message says why."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a tensor state dict from a released-format checkpoint or a bare state dict file.

    Keys lose any ``module.`` prefix. Raises :class:`CheckpointError` (one line) when the file is
    missing, unreadable or truncated, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path you gave")
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"checkpoint {path} is a Git LFS pointer, not the weights; fetch "
                              "the real file (git lfs pull, or download it directly)")
    # torch files are zip archives (PK) or, before torch 1.6, pickles (protocol 2+ opens 0x80).
    if not head.startswith((b"PK", b"\x80")):
        raise CheckpointError(f"checkpoint {path} is not a torch file (it starts with "
                              f"{head[:16]!r}); give the .pth file itself")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {path} holds pickled Python objects (a whole saved model or a "
            "training checkpoint), which are not loaded for safety; give a file holding a "
            "state_dict, such as a released Wav2Lip .pth"
        ) from None
    except Exception as err:  # torch raises many types for damaged files; all mean the same here
        size = path.stat().st_size
        expected = RELEASED_BYTES.get(path.name)
        hint = f" (the released file is {expected:,} bytes)" if expected else ""
        raise CheckpointError(
            f"checkpoint {path} ({size:,} bytes) cannot be read ({type(err).__name__}): the file "
            f"is truncated or damaged; download it again{hint}"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"checkpoint {path} holds no state dict (found {type(obj).__name__}"
            f"{' with keys ' + str(sorted(obj)[:5]) if isinstance(obj, dict) else ''}); "
            "give a released Wav2Lip file or a saved state_dict"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_state_dict(
    state: dict[str, torch.Tensor], model: nn.Module, source: str, kind: str = "Wav2Lip"
) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``model``'s keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if len(missing) == len(expected):
        raise CheckpointError(
            f"{source} is not a {kind} checkpoint: none of its {len(state)} keys match "
            f"(first: {next(iter(state))!r}); give a {kind} checkpoint"
        )
    if missing or unexpected:
        found = [f"{len(keys)} {what} keys (first: {keys[0]})"
                 for keys, what in ((missing, "missing"), (unexpected, "unexpected")) if keys]
        raise CheckpointError(
            f"{source} does not match {kind}: {', '.join(found)}; "
            "was it saved from another architecture or slim factor?"
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        key, got, want = wrong[0]
        raise CheckpointError(
            f"{source} has {len(wrong)} tensors of the wrong shape (first: {key} is {got}, "
            f"{kind} needs {want}); was it saved from another slim factor?"
        )


def check_family(state: dict[str, torch.Tensor], source: str, kind: str) -> None:
    """Raise a one-line :class:`CheckpointError` when ``state`` holds another released model.

    Args:
        state: State dict with any ``module.`` prefix already removed.
        source: Where it came from, for the message.
        kind: The model family wanted, a key of :data:`FAMILIES`.
    """
    for other, (prefix, holds, _) in FAMILIES.items():
        if other != kind and any(k.startswith(prefix) for k in state):
            wanted = FAMILIES[kind][2] if kind in FAMILIES else f"a {kind} checkpoint"
            example = next(k for k in state if k.startswith(prefix))
            raise CheckpointError(
                f"{source} is not a {kind} checkpoint: it holds a {holds} ({len(state)} keys, "
                f"e.g. {example!r}); give {wanted}"
            )


def load_weights(model: nn.Module, path: str | Path, kind: str = "Wav2Lip") -> nn.Module:
    """Load a checkpoint into ``model`` after checking every key and shape; returns the model."""
    state = read_state_dict(path)
    check_family(state, str(path), kind)
    check_state_dict(state, model, str(path), kind)
    model.load_state_dict(state)
    log.info("loaded %s weights from %s (%d tensors)", kind, path, len(state))
    return model
