"""The one exception family nsteer raises. Every message says what went wrong and what to do."""

from __future__ import annotations


class NsteerError(Exception):
    """Base of every error nsteer raises on purpose; the CLI prints its message without a traceback."""

    exit_code: int = 2


class RecipeError(NsteerError):
    """A recipe (YAML or dict) is malformed; the message names the file, line and field of every problem found."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems  # one self-contained line each: "FILE, line N, field F: what is wrong"


class PromptDataError(NsteerError):
    """A prompt, or a prompt or phrasing file, is missing, empty, malformed or too long for the model."""


class ModelError(NsteerError):
    """A model cannot be opened, or its structure is not understood."""


class VectorFileError(NsteerError):
    """A vector file is unreadable, truncated, or was made for another model."""


class EvaluationError(NsteerError):
    """A checker, a data file for evaluation, or a search setting is invalid."""


class RemoteError(NsteerError):
    """Remote execution on NDIF failed: key, model, timeout, server or connection."""


class FileError(NsteerError):
    """A path names the wrong kind of thing (a folder, a pipe, a device), or a file is too large to read."""


class ArgumentError(NsteerError, ValueError):
    """An SDK function got an argument it cannot use (also a ValueError, for callers that catch those)."""


def require(value: object, kind: type | tuple[type, ...], name: str, hint: str = "") -> None:
    """Refuse an SDK argument of the wrong type with an ArgumentError naming it, not an AttributeError deep inside.

    ``bool`` does not pass for ``int`` (``True`` is no layer, seed or count).
    """
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return
    expected = " or ".join(item.__name__ for item in kinds)
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise ArgumentError(f"{name} must be {expected}, got {type(value).__name__} {shown}.{' ' + hint if hint else ''}")
