"""Interventions from text: the one parser the CLI (``--suppress/--boost/--force/--ablate/--recipe``), the Lab's
controls and sweeps (intervention lists given as strings) share.

Forms: ``suppress=TOKEN``, ``boost=TOKEN=FACTOR``, ``force=STEP=TOKEN``, ``ablate=LAYER:HEAD``, or a recipe spec
(``suppress-word:word=Paris``, see :mod:`labkit.interventions.recipes`). A TOKEN that reads as an integer is a token
id; anything else is the text of one token (spaces kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from labkit.core.errors import InvalidArgument
from labkit.interventions.activation import AblateHead
from labkit.interventions.base import Intervention
from labkit.interventions.recipes import recipe
from labkit.interventions.token import Boost, ForceTokens, Suppress

#: The short forms of intervention specs: kind -> what follows ``kind=``.
FORMS = {"suppress": "TOKEN", "boost": "TOKEN=FACTOR", "force": "STEP=TOKEN", "ablate": "LAYER:HEAD"}


def token_arg(text: str) -> str | int:
    """A token given as text: an integer is an id, anything else is text (spaces kept)."""
    return int(text) if text.strip().lstrip("-").isdigit() else text


def from_text(suppress: Sequence[str] = (), boost: Sequence[str] = (), force: Sequence[str] = (),
              ablate: Sequence[str] = (), prefix: str = "") -> list[Intervention]:
    """Interventions from the four short forms (errors name each as ``prefix + kind``, e.g. ``--boost``): one
    Suppress of every suppressed token, a Boost per ``TOKEN=FACTOR``, one ForceTokens of every ``STEP=TOKEN``, an
    AblateHead per ``LAYER:HEAD``."""
    def bad(kind: str, item: str, example: str) -> InvalidArgument:
        return InvalidArgument(f"{prefix}{kind} must look like {FORMS[kind]} (e.g. {example!r}); got {item!r}")

    out: list[Intervention] = [Suppress([token_arg(t) for t in suppress])] if suppress else []
    for item in boost:
        tok, _, factor = item.rpartition("=")
        try:
            value = float(factor)
        except ValueError:
            tok = ""
        if not tok:
            raise bad("boost", item, " science=3")
        out.append(Boost(token_arg(tok), value))
    forced = {}
    for item in force:
        step, eq, tok = item.partition("=")
        if not eq or not step.strip().isdigit() or not tok:
            raise bad("force", item, "0= Rome")
        forced[int(step)] = token_arg(tok)
    if forced:
        out.append(ForceTokens(forced))
    for item in ablate:
        layer, colon, head = item.partition(":")
        if not colon or not layer.strip().isdigit() or not head.strip().isdigit():
            raise bad("ablate", item, "3:1")
        out.append(AblateHead(int(layer), int(head)))
    return out


def parse(session: Any, spec: str) -> list[Intervention]:
    """The interventions one string names: a short form ``kind=...`` (see :data:`FORMS`) or a recipe spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgument(f"an intervention spec must be a non-empty string; got {spec!r}")
    kind, eq, rest = spec.partition("=")
    if eq and kind.strip() in FORMS:
        return from_text(**{kind.strip(): [rest]})
    return recipe(session, spec)
