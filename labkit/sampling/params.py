"""Each tunable parameter declared once, on its class: range, unit, default, the Lab's slider and help text.

A sampler (or beam search) lists its parameters as ``params = {"temperature": TEMPERATURE, ...}``; everything is
built from that table: the check on every assignment (the live-slider rule), the Lab's sliders and sampler box,
spec strings (``classic:temperature=0.7``), the command line's sampler help and the docs. Written by hand because
no library describes a live, range-checked parameter with its slider (traitlets checks types, not ranges with units).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from labkit.core.errors import InvalidArgument


@dataclass(frozen=True)
class Param:
    """One parameter: ``default``; ``kind`` float | int | bool | str; allowed values ``lo``..``hi`` (ends open when
    ``open_lo``/``open_hi``) or ``choices``; ``unit`` ("bits", "bits²", "nats" or ""); ``slider`` (min, max, step)
    for the Lab, None for no slider; ``note`` words after the range ("0 disables it"); ``help`` one sentence."""

    default: Any
    kind: type = float
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    unit: str = ""
    slider: tuple[float, float, float] | None = None
    note: str = ""
    help: str = ""
    choices: tuple[Any, ...] = ()

    def allowed(self) -> str:
        """The allowed values as shown to the user, e.g. "in (0, 1]" or "an integer ≥ 1"."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        unit = f" {self.unit}" if self.unit else ""
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}{')' if self.open_hi else ']'}{unit}"
        elif self.lo is not None:
            text = f"{'>' if self.open_lo else '≥'} {self.lo:g}{unit}"
        elif self.hi is not None:
            text = f"{'<' if self.open_hi else '≤'} {self.hi:g}{unit}"
        else:
            text = "any finite number"
        text = f"an integer {text}" if self.kind is int else text
        return f"{text} ({self.note})" if self.note else text

    def check(self, name: str, value: Any) -> Any:
        """``value`` normalised (float or int), or InvalidArgument naming ``name``, the value and what is allowed."""
        if self.choices:
            if not any(value is c or (type(value) is type(c) and value == c) for c in self.choices):
                raise InvalidArgument(f"{name} must be {self.allowed()}; got {value!r}")
            return value
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidArgument(f"{name} must be {self.allowed()}; got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidArgument(f"{name} must be a finite number {self.allowed()}; got {value!r}")
        below = self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo)
        above = self.hi is not None and (value >= self.hi if self.open_hi else value > self.hi)
        if below or above:
            raise InvalidArgument(f"{name} must be {self.allowed()}; got {value!r}")
        return int(value) if self.kind is int else float(value)

    def but(self, **changes: Any) -> Param:
        """This parameter with some fields changed (another default, another slider)."""
        return dataclasses.replace(self, **changes)


# the parameters several samplers share (each class may change the default with .but(default=...))
TEMPERATURE = Param(1.0, lo=0.0, open_lo=True, slider=(0.05, 2.0, 0.05), note="use sampler=None for greedy",
                    help="divides the logits: below 1 sharpens the distribution, above 1 flattens it")
TOP_K = Param(0, int, lo=0, slider=(0, 200, 1), note="0 disables it", help="keep the k most probable tokens")
TOP_P = Param(1.0, lo=0.0, hi=1.0, open_lo=True, slider=(0.05, 1.0, 0.01),
              help="keep the smallest set of tokens whose probability adds up to p (nucleus sampling)")
MIN_P = Param(0.0, lo=0.0, hi=1.0, open_hi=True, slider=(0.0, 0.5, 0.01), note="0 disables it",
              help="drop tokens less probable than min_p × the top probability")
ALPHA = Param(0.1, lo=0.0, hi=1.0, open_lo=True, slider=(0.01, 1.0, 0.01),
              help="plausibility threshold: keep tokens with p ≥ alpha × the top probability")
THRESHOLD = Param(0.0, lo=0.0, unit="bits", slider=(0.0, 8.0, 0.05))
"""An entropy threshold (bits); varentropy thresholds use ``THRESHOLD.but(unit="bits²")``."""


class Tunable:
    """Base of everything with declared parameters (samplers, beam search): each assignment to a parameter is
    checked against its :class:`Param` (so a slider moved during a run changes the next token, or shows why not)."""

    name: ClassVar[str] = "tunable"
    params: ClassVar[dict[str, Param]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """The class's docstring gains its parameter table (the docs are built from the declarations too)."""
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("params"):
            cls.__doc__ = inspect.cleandoc(cls.__doc__ or "") + "\n\n" + table(cls)

    def __setattr__(self, key: str, value: Any) -> None:
        if key in type(self).params:
            value = self.validate(key, value)
        super().__setattr__(key, value)

    def validate(self, key: str, value: Any) -> Any:
        """Check one parameter; return the (normalised) value or raise InvalidArgument."""
        return type(self).params[key].check(key, value) if key in type(self).params else value

    def config(self) -> dict[str, Any]:
        """Name and current parameters (stored in Trace metadata)."""
        return {"name": self.name, **{p: getattr(self, p) for p in self.params}}

    def __repr__(self) -> str:
        args = ", ".join(f"{p}={getattr(self, p)!r}" for p in self.params)
        return f"{type(self).__name__}({args})"


def table(cls: type[Tunable]) -> str:
    """``cls``'s parameters as a reStructuredText list (appended to its docstring)."""
    rows = [f"- ``{name}`` (default ``{p.default!r}``): {p.allowed()}" + (f"; {p.help}" if p.help else "")
            for name, p in cls.params.items()]
    return "Parameters (declared in ``params``; checked on every assignment):\n\n" + "\n".join(
        row.replace("*", "\\*") for row in rows)


def describe(cls: type[Tunable]) -> str:
    """One line per parameter of ``cls``: name, default, what is allowed and what it does (CLI help, docs)."""
    return "\n".join(f"{name} = {p.default!r}: {p.allowed()}" + (f"; {p.help}" if p.help else "")
                     for name, p in cls.params.items())
