"""What every intervention is, the context token-level ones see, and the scope that switches them on and off.

Two kinds, applied by the one decoding loop:

- :class:`TokenIntervention` acts on each step's logits (after the step's metrics are taken from the model's
  logits, before the sampler): ``apply(logits, ctx) -> logits``.
- :class:`ActivationIntervention` puts forward hooks on the model while it is active (``attach`` returns the
  handles; the scope removes them on exit, also when the body raises), so every forward pass inside the scope
  (generation, ``next_token``, ``score``, ...) runs with it.

Interventions compose in the order given: token-level ones are applied in that order, and PyTorch runs hooks on
one module in the order they were registered.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from labkit.core.errors import InvalidArgument


@dataclass
class InterventionContext:
    """What a token-level intervention knows at one step."""

    step: int
    """Index of the token being generated (0 = first new token)."""
    token_ids: list[int]
    """Token ids generated so far (not the prompt)."""
    prompt_ids: list[int]
    session: Any = None
    _text: str | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        """The generated text so far (decoded on first use)."""
        if self._text is None:
            self._text = self.session.tokenizer.decode(self.token_ids, skip_special_tokens=True) \
                if self.session is not None else ""
        return self._text


class Intervention:
    """Base class. ``bind(session)`` resolves names (token text, layers) against the session's model."""

    def bind(self, session: Any) -> None:
        """Resolve and check arguments against ``session`` (called when the intervention is switched on)."""

    def describe(self) -> str:
        """How the intervention is named in ``Step.interventions`` and tables (its repr)."""
        return repr(self)


class TokenIntervention(Intervention, abc.ABC):
    """Edits each step's logits, after the step's metrics are taken and before the sampler."""

    @abc.abstractmethod
    def apply(self, logits: torch.Tensor, ctx: InterventionContext) -> torch.Tensor:
        """Shape (1, V) -> (1, V): the step's logits after the intervention (a new tensor)."""


class ActivationIntervention(Intervention, abc.ABC):
    """Hooks on the model's sites for every forward pass of its scope (the metrics then include its effect)."""

    @abc.abstractmethod
    def attach(self, model: Any) -> list[Any]:
        """Register this intervention's hooks on ``model`` (through its :mod:`labkit.model.hooks` sites); return their
        handles."""


def check_interventions(interventions: Any) -> list[Intervention]:
    """The interventions as a list, each checked to be an Intervention."""
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    if interventions is None:
        return []
    items = list(interventions)
    for item in items:
        if not isinstance(item, Intervention):
            raise InvalidArgument(f"interventions must be labkit interventions (e.g. Suppress(' Paris')); got "
                                  f"{type(item).__name__}")
    return items


@contextlib.contextmanager
def activated(session: Any, interventions: Sequence[Intervention], bind: bool = True
              ) -> Iterator[list[TokenIntervention]]:
    """Bind every intervention (unless already bound), attach the activation-level ones (removed on exit, also on
    error) and yield the token-level ones in order."""
    for item in interventions if bind else ():
        item.bind(session)
    with contextlib.ExitStack() as scope:  # hooks removed on exit, also on error (last attached first)
        for item in interventions:
            if isinstance(item, ActivationIntervention):
                for handle in item.attach(session.model):
                    scope.callback(handle.remove)
        yield [i for i in interventions if isinstance(i, TokenIntervention)]


def apply_all(logits: torch.Tensor, ctx: InterventionContext, items: Sequence[TokenIntervention]
              ) -> tuple[torch.Tensor, list[str]]:
    """Shape (1, V) -> (1, V): ``logits`` after each token-level intervention in order, and the descriptions of those
    that changed them. Logits with a NaN or no finite value raise InvalidArgument naming the intervention (a run
    stopped this way keeps its partial trace)."""
    changed: list[str] = []
    for item in items:
        new = item.apply(logits, ctx)
        if bool(torch.isnan(new).any()) or not bool(torch.isfinite(new).any()):
            raise InvalidArgument(f"{item.describe()} returned logits with NaN or no finite value at step {ctx.step}: "
                                  "an intervention must leave at least one token possible (the partial trace is kept)")
        if not torch.equal(new, logits):
            changed.append(item.describe())
        logits = new
    return logits, changed


def apply_rows(logits: torch.Tensor, step: int, generated: list[int], drafted: list[int], prompt_ids: list[int],
               session: Any, items: Sequence[TokenIntervention]) -> tuple[torch.Tensor, list[list[str]]]:
    """Shape (n, V) -> (n, V): the logits of one round after ``items`` (:func:`apply_all` per row), and what changed
    each row. Row i is step ``step + i``, generated after ``generated + drafted[:i]`` (its edit is used only if those
    drafted tokens are kept)."""
    if not items:
        return logits, [[] for _ in range(logits.shape[0])]
    rows, changed = [], []
    for i in range(logits.shape[0]):
        ctx = InterventionContext(step + i, generated + drafted[:i], prompt_ids, session)
        row, names = apply_all(logits[i:i + 1], ctx, items)  # (1, V)
        rows.append(row)
        changed.append(names)
    return torch.cat(rows), changed

