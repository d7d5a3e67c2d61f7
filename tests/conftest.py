"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Real sample media live next to the repository, never inside it (see shared/samples/SOURCES.md);
# WAV2LIP_SAMPLES points the tests at another copy.
SAMPLES_DIR = Path(
    os.environ.get("WAV2LIP_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "samples")
)


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """Folder of real sample media; skips the test when it is absent."""
    if not SAMPLES_DIR.is_dir():
        pytest.skip(f"sample media not found at {SAMPLES_DIR}: set WAV2LIP_SAMPLES to that folder")
    return SAMPLES_DIR
