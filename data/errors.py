"""Errors shared by the preprocessing modules (``faces``, ``video``, ``preprocess``).

They live apart so that the face and video helpers can raise them without importing the
preprocessing driver that catches them.
"""

from __future__ import annotations


class PreprocessError(ValueError):
    """Bad arguments to ``preprocess``; the message is one line and names the fix."""


class ClipRejected(Exception):
    """A clip that cannot be used; the message is the one-line reason shown in the summary."""


def first_reason(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
