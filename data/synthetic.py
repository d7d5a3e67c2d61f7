"""A tiny generated dataset in the preprocessed layout, so the main job runs with no input files.

Each clip is a drawn face whose mouth opens with the loudness of a synthetic voiced signal, written
straight as face crops (a known box, as with the original's ``--box`` option) plus ``audio.wav``.
It exercises every layer of the pipeline; it says nothing about quality on real faces.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import torch

from data.audio import FPS, SAMPLE_RATE, save_wav

log = logging.getLogger(__name__)

CROP = 128


def _syllable_envelope(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Loudness per audio sample: bursts of 120-300 ms separated by short pauses."""
    envelope = np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)
    t = rng.uniform(0.05, 0.2)
    while t < seconds:
        length = rng.uniform(0.12, 0.3)
        start, stop = int(t * SAMPLE_RATE), min(int((t + length) * SAMPLE_RATE), len(envelope))
        envelope[start:stop] = np.hanning(stop - start) * rng.uniform(0.4, 1.0)
        t += length + rng.uniform(0.05, 0.25)
    return envelope


def _voice(rng: np.random.Generator, envelope: np.ndarray) -> np.ndarray:
    """A harmonic signal with a wandering pitch, shaped by ``envelope``; peaks near 0.5."""
    time = np.arange(len(envelope)) / SAMPLE_RATE
    pitch = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * time))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    harmonics = sum(np.sin(h * phase) / h for h in range(1, 12))
    noise = rng.normal(0, 0.01, len(envelope))
    wave = envelope * harmonics + noise
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


def _draw_face(rng: np.random.Generator, openings: np.ndarray) -> list[np.ndarray]:
    """One BGR crop per frame: a face with fixed identity whose mouth opens by ``openings``."""
    skin = tuple(int(c) for c in rng.integers(90, 230, 3))
    background = tuple(int(c) for c in rng.integers(0, 80, 3))
    centre = (CROP // 2 + int(rng.integers(-6, 7)), CROP // 2 + int(rng.integers(-4, 5)))
    axes = (int(rng.integers(44, 56)), int(rng.integers(54, 62)))
    frames = []
    for i, opening in enumerate(openings):
        image = np.full((CROP, CROP, 3), background, dtype=np.uint8)
        # A slight sway keeps consecutive frames from being identical, as on real footage.
        sway = int(round(2 * np.sin(i / 7)))
        cx, cy = centre[0] + sway, centre[1]
        cv2.ellipse(image, (cx, cy), axes, 0, 0, 360, skin, -1)
        for dx in (-18, 18):
            cv2.circle(image, (cx + dx, cy - 16), 6, (255, 255, 255), -1)
            cv2.circle(image, (cx + dx, cy - 16), 3, (40, 30, 20), -1)
        cv2.line(image, (cx, cy - 8), (cx - 4, cy + 10), tuple(c // 2 for c in skin), 2)
        mouth = (16, 2 + int(14 * opening))
        cv2.ellipse(image, (cx, cy + 30), mouth, 0, 0, 360, (40, 20, 120), -1)
        frames.append(image)
    return frames


def make_synthetic_dataset(
    root: str | Path, n_clips: int = 6, seconds: float = 3.0, n_val: int = 2, seed: int = 0
) -> Path:
    """Write ``n_clips`` generated clips under ``root`` with ``train.txt`` and ``val.txt``.

    The folder is built beside ``root`` and moved into place at the end, so an interrupted
    run never leaves a half-written dataset.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    names = [f"synthetic/clip{index:02d}" for index in range(n_clips)]
    for name in names:
        clip = staging / name
        clip.mkdir(parents=True)
        envelope = _syllable_envelope(rng, seconds)
        frame_times = (np.arange(int(seconds * FPS)) / FPS * SAMPLE_RATE).astype(int)
        openings = envelope[np.minimum(frame_times, len(envelope) - 1)]
        for index, image in enumerate(_draw_face(rng, openings)):
            cv2.imwrite(str(clip / f"{index}.jpg"), image)
        save_wav(clip / "audio.wav", torch.from_numpy(_voice(rng, envelope)))
    (staging / "train.txt").write_text("\n".join(names[n_val:]) + "\n")
    (staging / "val.txt").write_text("\n".join(names[:n_val]) + "\n")
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)
    log.info("wrote a generated sample of %d clips (%.1f s each) to %s", n_clips, seconds, root)
    return root
