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
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from labkit.errors import InvalidArgument


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
        return repr(self)


class TokenIntervention(Intervention, abc.ABC):
    @abc.abstractmethod
    def apply(self, logits: torch.Tensor, ctx: InterventionContext) -> torch.Tensor:
        """Shape (1, V) -> (1, V): the step's logits after the intervention (a new tensor)."""


class ActivationIntervention(Intervention, abc.ABC):
    @abc.abstractmethod
    def attach(self, model: Any) -> list[Any]:
        """Register this intervention's hooks on ``model``; return their handles."""


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
    handles: list[Any] = []
    try:
        for item in interventions:
            if isinstance(item, ActivationIntervention):
                handles += item.attach(session.model)
        yield [i for i in interventions if isinstance(i, TokenIntervention)]
    finally:
        for h in reversed(handles):
            h.remove()


def apply_all(logits: torch.Tensor, ctx: InterventionContext, items: Sequence[TokenIntervention]) -> torch.Tensor:
    for item in items:
        logits = item.apply(logits, ctx)
    return logits


# -- hook points ----------------------------------------------------------------------------------------------

def decoder_layers(model: Any) -> Any:
    """The model's list of decoder layers (``model.model.layers`` in Llama-style models)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        names = [n for n, _ in model.named_children()]
        raise InvalidArgument(f"this model has no decoder layers at model.model.layers (children: {names}); "
                              "activation interventions need a Llama-style causal LM")
    return layers


def check_layer(model: Any, layer: Any) -> int:
    n = len(decoder_layers(model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise InvalidArgument(f"layer must be an integer in [0, {n}) (or negative from the end); this model has "
                              f"{n} layers; got {layer!r}")
    return layer % n


def module_named(model: Any, name: str) -> torch.nn.Module:
    """``model.get_submodule(name)`` with an error that lists the closest names that exist."""
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else f"; e.g. {list(modules)[1:6]}"
        raise InvalidArgument(f"the model has no module {name!r}{hint}")
    return modules[name]


def replace_output(output: Any, hidden: torch.Tensor) -> Any:
    """A module output with its hidden-state tensor replaced (outputs are a tensor or a tuple led by one)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output
