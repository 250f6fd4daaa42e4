"""One exception type per family of failure.

Every labkit error derives from :class:`LabkitError`. Messages say what was wrong, the value that was
given and what is allowed, e.g. ``max_new_tokens must be a positive integer, got 0``.
"""

from __future__ import annotations

from collections.abc import Iterable


class LabkitError(Exception):
    """Base class of every error labkit raises on purpose."""


class InvalidArgument(LabkitError, ValueError):
    """A parameter has a value outside what is allowed (bad prompt, bad dtype, bad sampler setting...)."""


class TokenizationError(InvalidArgument):
    """Text that must be exactly one token is not (the message shows how it tokenizes)."""


class ModelLoadError(LabkitError):
    """A model folder is missing, has no safetensors weights, or could not be loaded."""


class DeviceUnavailable(LabkitError):
    """The requested device or backend is not available here (CUDA absent, xformers on CPU...)."""


class MemoryBudgetExceeded(LabkitError, MemoryError):
    """A feature would need more memory than the budget (free RAM or GPU memory, or
    :func:`labkit.core.memory.budget`); the message names the bytes needed, the budget and how to need less. Raised
    before anything is allocated: the session stays usable."""


class SessionBusy(LabkitError, RuntimeError):
    """A generation is already running on this Session (in another thread)."""


class TraceFormatError(LabkitError, ValueError):
    """A file is not a labkit Trace, or is malformed."""


class ActivationsFormatError(LabkitError, ValueError):
    """A file given to ``Activations.load`` is not a labkit activations file, or cannot be read."""


class LabkitWarning(UserWarning):
    """Warnings labkit issues itself (tests turn them into errors)."""


def invalid_choice(name: str, value: object, allowed: Iterable[object]) -> InvalidArgument:
    """Build the standard error for a parameter that must be one of a fixed set."""
    choices = ", ".join(repr(a) for a in allowed)
    return InvalidArgument(f"{name} must be one of {choices}; got {value!r}")


class UnsupportedArchitecture(LabkitError):
    """The model's architecture has no hook-site adapter, or a feature cannot run exactly on it (the message says
    what is missing and how to declare an adapter with :func:`labkit.model.hooks.register_adapter`)."""


class MissingExtra(LabkitError, ImportError):
    """An optional feature whose packages are not installed; the message names the pip extra that brings them."""


class SaveError(LabkitError, OSError):
    """A file could not be written (disk full, no permission, a folder in the way...); the file that was at the path
    before is untouched and no partial file is left."""


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` when it is an integer (a bool is not) in [lo, hi] (a None bound is open); otherwise the standard
    InvalidArgument: "``name`` must be a positive integer / an integer ≥ lo / an integer in [lo, hi]; got ...".
    The one helper for integer parameters, so every such message reads the same."""
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) or \
            (hi is not None and value > hi):
        if lo is not None and hi is not None:
            allowed = f"an integer in [{lo}, {hi}]"
        elif lo is not None:
            allowed = "a positive integer" if lo == 1 else f"an integer ≥ {lo}"
        else:
            allowed = "an integer" if hi is None else f"an integer ≤ {hi}"
        raise InvalidArgument(f"{name} must be {allowed}; got {value!r}")
    return value


def deprecated(message: str) -> None:
    """A DeprecationWarning attributed to the first caller outside labkit (and outside importlib's machinery, which
    ``warnings`` skips by itself), so it shows in a notebook at the user's line."""
    import sys
    import warnings

    level, frame = 2, sys._getframe(1)  # stacklevel 2 is deprecated()'s caller
    while frame is not None:
        internal = "importlib" in frame.f_code.co_filename and "_bootstrap" in frame.f_code.co_filename
        if not internal and str(frame.f_globals.get("__name__", "")).split(".")[0] != "labkit":
            break
        level += not internal
        frame = frame.f_back
    warnings.warn(message, DeprecationWarning, stacklevel=level)
