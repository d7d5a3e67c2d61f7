"""The architecture spec of a Wav2Lip student: widths and residual layers, stage by stage.

A :class:`StudentSpec` is plain data (numbers, tuples, a name), so it can be written into a
checkpoint and read back with ``torch.load(weights_only=True)``. Every width starts from the
original Wav2Lip's, scaled by the global ``slim`` factor; per-stage overrides replace single widths
with an absolute channel count. Residual layers are counted per stage, from the original count down
to zero; a stage that keeps ``k`` of them keeps the first ``k`` (see :mod:`models.init`).

Stages, in the original's order:

- ``face``: 7 widths, the six face-encoder stages (16/32/64/128/256/512) and the bottleneck (512).
- ``audio``: 5 widths, the four audio-encoder stages (32/64/128/256) and the embedding (512).
- ``decoder``: 7 widths, the outputs of decoder blocks 0-6 (512/512/512/384/256/128/64).
- ``head``: the output block's hidden conv (32).
- ``face_residuals`` (0/2/3/2/2/1), ``audio_residuals`` (2/2/2/1) and ``decoder_residuals``
  (1/2/2/2/2/2, for the transposed blocks 1-6; block 0 has none).

The face bottleneck and the audio embedding need not be equal: decoder block 0 maps the embedding
to its own width, and the bottleneck only enters through the concatenation after it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = [
    "AUDIO_RESIDUALS",
    "AUDIO_WIDTHS",
    "DECODER_RESIDUALS",
    "DECODER_WIDTHS",
    "FACE_RESIDUALS",
    "FACE_WIDTHS",
    "HEAD_WIDTH",
    "StudentSpec",
    "slim_width",
]

log = logging.getLogger(__name__)

FACE_WIDTHS = (16, 32, 64, 128, 256, 512, 512)
AUDIO_WIDTHS = (32, 64, 128, 256, 512)
DECODER_WIDTHS = (512, 512, 512, 384, 256, 128, 64)
HEAD_WIDTH = 32
FACE_RESIDUALS = (0, 2, 3, 2, 2, 1)
AUDIO_RESIDUALS = (2, 2, 2, 1)
DECODER_RESIDUALS = (1, 2, 2, 2, 2, 2)


def slim_width(channels: int, slim: float) -> int:
    """Channels a layer keeps under a slim factor: rounded, and never fewer than one."""
    return max(1, round(channels * slim))


def _widths(
    name: str, value: Sequence[int | None] | None, original: tuple[int, ...]
) -> tuple[int | None, ...] | None:
    if value is None:
        return None
    value = tuple(value)
    if len(value) != len(original):
        raise ValueError(f"{name} has {len(value)} widths, needs {len(original)} "
                         f"(one per stage, null to follow slim): {list(value)}")
    for width in value:
        if width is not None and (isinstance(width, bool) or not isinstance(width, int)
                                  or width < 1):
            raise ValueError(f"{name} width {width!r} must be a positive int or null: "
                             f"{list(value)}")
    return value


def _residuals(
    name: str, value: Sequence[int] | None, original: tuple[int, ...]
) -> tuple[int, ...] | None:
    if value is None:
        return None
    value = tuple(value)
    if len(value) != len(original):
        raise ValueError(f"{name} has {len(value)} counts, needs {len(original)} (one per stage, "
                         f"original {list(original)}): {list(value)}")
    for count, most in zip(value, original):
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= most:
            raise ValueError(f"{name} {list(value)} must count 0 to the original "
                             f"{list(original)} residual layers per stage")
    return value


@dataclass(frozen=True)
class StudentSpec:
    """Widths and residual layers of a Wav2Lip generator; the default is the original teacher.

    Args:
        slim: Global width factor in (0, 1]; every width not overridden is
            ``max(1, round(original * slim))``.
        face: Seven face-encoder widths (six stages, bottleneck), ``None`` entries follow slim.
        audio: Five audio-encoder widths (four stages, embedding).
        decoder: Seven decoder-block output widths.
        head: Width of the output block's hidden conv.
        face_residuals: Residual layers kept per face-encoder stage (six counts).
        audio_residuals: Residual layers kept per audio-encoder stage (four counts).
        decoder_residuals: Residual layers kept per transposed decoder block 1-6 (six counts).
        name: The preset this spec was built from, for reports (it does not change the network).
    """

    slim: float = 1.0
    face: tuple[int | None, ...] | None = None
    audio: tuple[int | None, ...] | None = None
    decoder: tuple[int | None, ...] | None = None
    head: int | None = None
    face_residuals: tuple[int, ...] | None = None
    audio_residuals: tuple[int, ...] | None = None
    decoder_residuals: tuple[int, ...] | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if isinstance(self.slim, bool) or not isinstance(self.slim, (int, float)) or not (
            0.0 < self.slim <= 1.0
        ):
            raise ValueError(f"slim must be in (0, 1], got {self.slim}; 1.0 is the original "
                             "Wav2Lip")
        if self.head is not None and (isinstance(self.head, bool) or not isinstance(self.head, int)
                                      or self.head < 1):
            raise ValueError(f"head width {self.head!r} must be a positive int or null")
        # Hydra hands lists over as ListConfig; store plain tuples so the spec is hashable data.
        set_ = object.__setattr__
        set_(self, "slim", float(self.slim))
        set_(self, "name", str(self.name))
        set_(self, "face", _widths("face", self.face, FACE_WIDTHS))
        set_(self, "audio", _widths("audio", self.audio, AUDIO_WIDTHS))
        set_(self, "decoder", _widths("decoder", self.decoder, DECODER_WIDTHS))
        set_(self, "face_residuals",
             _residuals("face_residuals", self.face_residuals, FACE_RESIDUALS))
        set_(self, "audio_residuals",
             _residuals("audio_residuals", self.audio_residuals, AUDIO_RESIDUALS))
        set_(self, "decoder_residuals",
             _residuals("decoder_residuals", self.decoder_residuals, DECODER_RESIDUALS))

    def _resolve(
        self, overrides: tuple[int | None, ...] | None, original: tuple[int, ...]
    ) -> tuple[int, ...]:
        overrides = overrides or (None,) * len(original)
        return tuple(slim_width(o, self.slim) if w is None else w
                     for w, o in zip(overrides, original))

    def face_widths(self) -> tuple[int, ...]:
        """Output widths of the seven face-encoder blocks."""
        return self._resolve(self.face, FACE_WIDTHS)

    def audio_widths(self) -> tuple[int, ...]:
        """Output widths of the four audio-encoder stages and of the embedding."""
        return self._resolve(self.audio, AUDIO_WIDTHS)

    def decoder_widths(self) -> tuple[int, ...]:
        """Output widths of the seven decoder blocks (before their skip concatenation)."""
        return self._resolve(self.decoder, DECODER_WIDTHS)

    def head_width(self) -> int:
        """Width of the output block's hidden conv."""
        return slim_width(HEAD_WIDTH, self.slim) if self.head is None else self.head

    def residual_counts(self) -> dict[str, tuple[int, ...]]:
        """Residual layers per stage: ``{"face": 6 counts, "audio": 4, "decoder": 6}``."""
        return {
            "face": self.face_residuals or FACE_RESIDUALS,
            "audio": self.audio_residuals or AUDIO_RESIDUALS,
            "decoder": self.decoder_residuals or DECODER_RESIDUALS,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, a string) for checkpoints and JSON reports."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentSpec:
        """Inverse of :meth:`to_dict`; raises ValueError naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown StudentSpec keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)
