"""Face detection and the per-frame face policy of preprocessing.

Holds the detector interface (``FaceDetector``) with its default OpenCV Haar backend and the
``make_detector`` factory (S3FD lives in ``data.s3fd``), the policy for missing, tiny and several
faces (``FacePolicy``, ``choose_face``), and the box arithmetic shared by the backends and the crop
writer: detection on a downscaled copy, centred smoothing and padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from data.errors import ClipRejected, PreprocessError

MULTI_FACE_POLICIES = ("largest", "skip", "reject")
DROP_REASONS = ("no_face", "tiny_face", "several_faces")

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive


class FaceDetector(Protocol):
    """Anything that finds faces in a full-resolution BGR frame (Haar, S3FD, a test stub).

    ``detect`` returns every face as ``(x1, y1, x2, y2)`` or ``(x1, y1, x2, y2, score)`` in the
    frame's pixels; a single box or None is accepted too. Detectors may work on a downscaled copy
    but must return full-resolution coordinates, and must be picklable for ``workers > 1``.
    """

    def detect(self, frame_bgr: np.ndarray) -> Sequence[Sequence[float]] | Box | None:
        """Return the faces found in the frame."""
        ...


@dataclasses.dataclass(frozen=True)
class FacePolicy:
    """What to do with each frame's detections, and how to turn a box into a crop.

    Args:
        min_face: Faces whose shorter side is below this many pixels are "tiny": a frame with only
            tiny faces is dropped.
        multi_face: With several faces of at least ``min_face``: ``largest`` keeps the largest,
            ``skip`` drops the frame, ``reject`` rejects the whole clip.
        smooth: Boxes are the mean over this many consecutive source frames, centred (1 = raw
            boxes, as the original's preprocessing; its inference averages 5).
        pads: Pixels added (top, bottom, left, right) after smoothing, clipped to the frame. The
            original's training data used none; its inference default is (0, 10, 0, 0).
    """

    min_face: int = 40
    multi_face: str = "largest"
    smooth: int = 5
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)

    def __post_init__(self) -> None:
        if self.multi_face not in MULTI_FACE_POLICIES:
            raise PreprocessError(f"multi_face must be one of {', '.join(MULTI_FACE_POLICIES)}, "
                                  f"got {self.multi_face!r}")
        if self.smooth < 1:
            raise PreprocessError(f"smooth must be a window of 1 or more frames, got "
                                  f"{self.smooth}; use 1 for raw boxes")
        if len(self.pads) != 4:
            raise PreprocessError(f"pads needs 4 values (top bottom left right), got {self.pads}")
        if self.min_face < 1:
            raise PreprocessError(f"min_face must be at least 1 pixel, got {self.min_face}")


def downscale(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink ``image`` so its longer side is at most ``max_side`` (0: keep it as is).

    Returns:
        The image to detect on and its scale relative to the input (1.0 when not shrunk).
    """
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w)) if max_side else 1.0
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image, scale


def full_res_box(box: Sequence[float], scale: float, width: int, height: int) -> Box:
    """Map a box found at ``scale`` back to a ``width`` x ``height`` frame, clipped to it."""
    x1, y1, x2, y2 = box[:4]
    return (
        max(0, round(x1 / scale)), max(0, round(y1 / scale)),
        min(width, round(x2 / scale)), min(height, round(y2 / scale)),
    )


class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade; ships with opencv-python, so nothing to download.

    Args:
        min_size: Smallest face side searched for, in full-resolution pixels.
        max_side: Frames with a longer side are downscaled to it before detection, for speed;
            boxes are returned at full resolution.
    """

    def __init__(self, min_size: int = 20, max_side: int = 360) -> None:
        self.min_size = min_size
        self.max_side = max_side
        self._cascade = self._load()

    @staticmethod
    def _load() -> cv2.CascadeClassifier:
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        cascade = cv2.CascadeClassifier(str(path))
        if cascade.empty():
            raise RuntimeError(f"cannot load {path}; install opencv-python-headless 4.x")
        return cascade

    def __getstate__(self) -> dict[str, int]:
        return {"min_size": self.min_size, "max_side": self.max_side}  # cascades do not pickle

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(**state)

    def detect(self, frame_bgr: np.ndarray) -> list[Box]:
        """Every face at least ``min_size`` pixels wide, in full-resolution pixels."""
        h, w = frame_bgr.shape[:2]
        gray, scale = downscale(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY), self.max_side)
        min_px = max(1, int(self.min_size * scale))
        faces = self._cascade.detectMultiScale(
            cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5, minSize=(min_px, min_px)
        )
        return [full_res_box((x, y, x + bw, y + bh), scale, w, h) for x, y, bw, bh in faces]


def make_detector(
    name: str = "haar", s3fd_weights: str | Path | None = None, min_face: int = 40
) -> FaceDetector:
    """Build a detector by name (``haar`` or ``s3fd``).

    Raises:
        PreprocessError: Unknown name, or S3FD without a readable weight file.
    """
    if name == "haar":
        return HaarFaceDetector(min_size=max(1, min_face // 2))
    if name == "s3fd":
        from data.s3fd import S3FDError, S3FDFaceDetector

        if not s3fd_weights:
            raise PreprocessError("--detector s3fd needs --s3fd-weights PATH (the "
                                  "s3fd-619a316812.pth file); or use --detector haar")
        try:
            return S3FDFaceDetector(s3fd_weights)
        except S3FDError as exc:
            raise PreprocessError(str(exc)) from None
    raise PreprocessError(f"unknown detector {name!r}; choose haar or s3fd")


def as_boxes(found: Any) -> list[Box]:
    """Normalise a detector's answer to a list of integer boxes."""
    if found is None:
        return []
    if len(found) and np.isscalar(found[0]):
        found = [found]
    return [tuple(int(round(float(v))) for v in face[:4]) for face in found]


def choose_face(faces: Sequence[Box], policy: FacePolicy) -> tuple[Box | None, str]:
    """Apply the policy to one frame's faces.

    Returns:
        The chosen box and "" (or "several_faces" when the largest of several was picked), or,
        for a dropped frame, None and its reason (one of DROP_REASONS).

    Raises:
        ClipRejected: Several faces under ``multi_face="reject"``.
    """
    valid = [f for f in faces if f[2] > f[0] and f[3] > f[1]]
    if not valid:
        return None, "no_face"
    big = [f for f in valid if min(f[2] - f[0], f[3] - f[1]) >= policy.min_face]
    if not big:
        return None, "tiny_face"
    if len(big) > 1:
        if policy.multi_face == "skip":
            return None, "several_faces"
        if policy.multi_face == "reject":
            raise ClipRejected(f"{len(big)} faces in one frame (--multi-face reject); crop the "
                               f"video to one speaker or use --multi-face largest")
    largest = max(big, key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))
    return largest, "several_faces" if len(big) > 1 else ""


def smoothed_box(boxes: Sequence[Box | None], pos: int, half: int) -> tuple[float, ...]:
    """Mean of the kept boxes within ``half`` source frames of ``pos``."""
    near = [b for b in boxes[max(0, pos - half): pos + half + 1] if b is not None]
    return tuple(float(np.mean([b[k] for b in near])) for k in range(4))


def pad_box(
    box: Sequence[float], pads: tuple[int, int, int, int], width: int, height: int
) -> Box:
    """Round ``box``, add ``pads`` (top, bottom, left, right) and clip it to the frame."""
    x1, y1, x2, y2 = box
    top, bottom, left, right = pads
    return (
        max(0, round(x1) - left), max(0, round(y1) - top),
        min(width, round(x2) + right), min(height, round(y2) + bottom),
    )
