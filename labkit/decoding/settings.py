"""One generation's settings, validated once (in the spirit of transformers' ``GenerationConfig``), and what a run
carries to its driver.

``Session.generate``/``stream`` (and the command line, sweeps and the Lab) build one :class:`GenerationSettings`
from their arguments; its checks run when it is made (and against the model in :meth:`GenerationSettings.for_model`);
the loop reads it whole. :attr:`GenerationSettings.strategy` names the driver: ``"plain"`` and ``"speculative"`` run
:func:`labkit.decoding.loop.decode` (the round kind differs), ``"beam"`` runs :func:`labkit.decoding.beam.search`.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from labkit.core.errors import InvalidArgument, check_int, deprecated
from labkit.core.tokens import TokenTexts, token_id
from labkit.decoding.kv import check_kv, parse_kv
from labkit.measures.information import metric
from labkit.records.trace import Trace
from labkit.sampling.base import Greedy, Sampler
from labkit.sampling.beam import BeamSearch
from labkit.sampling.registry import parse_sampler
from labkit.speculative.speculator import check_speculative

CAPTURES: tuple[str, ...] = ("attention", "logits")
"""Extra per-step captures ``generate(capture=...)`` accepts, besides hook-site names (``"blocks.3.resid_post"``)."""

STRATEGIES: tuple[str, ...] = ("plain", "speculative", "beam")
"""The drivers a generation can run on (:attr:`GenerationSettings.strategy`)."""


@dataclass(frozen=True)
class StopRules:
    """When to end a generation (besides ``max_new_tokens`` and the stop event)."""

    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    """Token ids that end generation as end-of-sequence (the EOS token is kept as the last Step)."""
    stop_ids: frozenset[int] = frozenset()
    """User-given token ids that end generation (kept as the last Step)."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end generation once the generated text contains one (kept in the text)."""
    _tail: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        # a stop string ending at the newest token lies within the last len(s) tokens (+ slack for partial bytes)
        object.__setattr__(self, "_tail", max((len(s) for s in self.stop_strings), default=0) + 4)

    def reason(self, token_id: int, generated: list[int], decode: Callable[[list[int]], str]) -> str:
        """The stop reason after ``token_id`` was generated, or "" to go on."""
        if token_id in self.eos_ids:
            return "eos"
        if token_id in self.stop_ids:
            return "stop_token"
        if self.stop_strings:
            tail = decode(generated[-self._tail:])
            if any(s in tail for s in self.stop_strings):
                return "stop_string"
        return ""


@dataclass(frozen=True)
class GenerationSettings:
    """What one generation is asked to do, checked when made: the arguments of ``Session.generate``.

    ``sampler`` None is greedy; ``beam`` a :class:`~labkit.sampling.beam.BeamSearch` (or a number of beams) makes it
    a beam search (``sampler=BeamSearch(...)``, the old spelling, still works with a DeprecationWarning);
    ``speculative`` a draft; ``kv`` a cache policy or its spec; ``seed`` an int, a list (one row each) or None
    (drawn at random and recorded); ``n`` rows decoded together. After checking, ``sampler`` is a Sampler, ``kv`` a
    policy object or None, ``capture``/``metrics``/``interventions`` tuples and ``seeds`` one seed per row.
    """

    max_new_tokens: int = 64
    sampler: Any = None
    seed: int | Sequence[int] | None = None
    n: int | None = None
    stop: str | int | Sequence[str | int] | None = None
    chat: bool = False
    capture: Sequence[str] = ()
    top_k: int = 10
    interventions: Sequence[Any] = ()
    speculative: Any = None
    metrics: Sequence[str] = ()
    kv: Any = None
    beam: Any = None
    seeds: tuple[int, ...] = field(init=False, default=())
    """One seed per row: ``seed + b`` for row b, or the listed seeds."""

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1)
        spec = isinstance(self.sampler, str)
        self._set("sampler", _sampler(self.sampler))
        if isinstance(self.sampler, BeamSearch):
            if not spec:  # a spec names a strategy; an object passed as sampler= is the old spelling
                deprecated("sampler=BeamSearch(...) is deprecated: beam search is a decoding strategy, pass "
                           "beam=BeamSearch(...) (or beam=4)")
            if self.beam is not None:
                raise InvalidArgument("give beam search once: beam=BeamSearch(...), not also sampler=BeamSearch(...)")
            self._set("beam", self.sampler)
            self._set("sampler", Greedy())
        self._set("beam", _beam(self.beam))
        self._set_seeds()
        self._set("capture", _names("capture", self.capture))
        self._set("metrics", tuple(metric(name).name for name in _names("metrics", self.metrics)))
        self._set("kv", None if self.kv is None else parse_kv(self.kv))
        self._set("interventions", tuple(self.interventions) if isinstance(self.interventions, (list, tuple))
                  else self.interventions)
        check_speculative(self.speculative, self.sampler, self.capture)
        self._check_combinations()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen dataclass's own fields while it is made

    def _set_seeds(self) -> None:
        listed = list(self.seed) if isinstance(self.seed, (list, tuple)) else None
        if listed is not None and (not listed or (self.n is not None and self.n != len(listed))):
            raise InvalidArgument(f"seed as a list gives one seed per sequence (n = its length); got {self.seed!r} "
                                  f"with n={self.n!r}")
        if self.n is not None:
            check_int("n", self.n, 1, 4096)
        for one in listed or [self.seed]:
            if one is not None and (isinstance(one, bool) or not isinstance(one, int) or not 0 <= one < 2**63):
                raise InvalidArgument(f"seed must be an integer in [0, 2**63), a list of them, or None; got "
                                      f"{self.seed!r}")
        self._set("seeds", self.draw_seeds())

    def draw_seeds(self) -> tuple[int, ...]:
        """One seed per row: the listed seeds, or ``seed + b`` for row b; with no seed, a fresh random start (each
        generation of an unseeded settings object draws its own, as ``seed=None`` in keywords does)."""
        if isinstance(self.seed, (list, tuple)):
            return tuple(self.seed)
        first = self.seed if isinstance(self.seed, int) else secrets.randbits(63)
        return tuple((first + b) % 2**63 for b in range(self.n or 1))

    def _check_combinations(self) -> None:
        lossy = self.kv is not None and self.kv.spec != "full"
        if self.rows > 1 and (self.speculative is not None or lossy):
            raise InvalidArgument(f"n={self.rows} decodes a batch of sequences; speculative decoding and lossy kv "
                                  "policies work on one sequence: use n=None (or n=1) with them")
        if self.beam is not None and (self.rows > 1 or self.speculative is not None or lossy
                                      or any(c != "logits" for c in self.capture)):
            raise InvalidArgument("beam search runs its beams as the batch: it does not take n, speculative, a lossy "
                                  "kv policy or captures other than 'logits'")
        if self.kv is not None:
            check_kv(self.kv, self.speculative, self.capture)

    @property
    def rows(self) -> int:
        """How many sequences are decoded together."""
        return len(self.seeds)

    @property
    def batched(self) -> bool:
        """Whether ``generate`` returns a list of Traces (``n`` or a list of seeds was given)."""
        return self.n is not None or isinstance(self.seed, (list, tuple))

    @property
    def strategy(self) -> str:
        """The driver: "beam", "speculative" or "plain" (one of :data:`STRATEGIES`)."""
        return "beam" if self.beam is not None else "speculative" if self.speculative is not None else "plain"

    def for_model(self, info: Any, sites: Callable[[], Any], config: Any = None) -> None:
        """The checks that need the model: ``max_new_tokens`` below its context, ``top_k`` within its vocabulary,
        captured hook sites that exist (``sites()`` gives the model's Sites), the kv policy on its config."""
        if self.max_new_tokens >= info.context_length:
            raise InvalidArgument(f"max_new_tokens must be below the model's context of {info.context_length} tokens "
                                  f"(prompt included); got {self.max_new_tokens}")
        check_int("top_k", self.top_k, 1, info.vocab_size)
        for name in self.capture:
            if name not in CAPTURES:
                sites().resolve(name)  # an unknown site is refused with the close names
        if self.kv is not None:
            check_kv(self.kv, self.speculative, self.capture, config)

    def stop_rules(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> StopRules:
        """``stop`` as StopRules: strings and token ids (checked against ``vocab_size``), with the model's EOS ids."""
        items = [] if self.stop is None else [self.stop] if isinstance(self.stop, (str, int)) else list(self.stop)
        ids: set[int] = set()
        strings: list[str] = []
        for item in items:
            if isinstance(item, str):
                if item == "":
                    raise InvalidArgument("stop strings must not be empty")
                strings.append(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                if not 0 <= item < vocab_size:
                    raise InvalidArgument(f"stop token ids must be in [0, {vocab_size}); got {item}")
                ids.add(token_id(tokenizer, item))
            else:
                raise InvalidArgument(f"stop must hold strings and token ids; got {item!r}")
        return StopRules(self.max_new_tokens, eos_ids, frozenset(ids), tuple(strings))

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with ``changes`` (checked again); ``seed`` stays as given, so unseeded copies draw a new one."""
        return dataclasses.replace(self, **changes)


def _sampler(sampler: Any) -> Any:
    if sampler is None:
        return Greedy()
    if isinstance(sampler, str):
        return parse_sampler(sampler)  # a spec: "classic:temperature=0.7" (one naming beam search is routed to beam)
    if not isinstance(sampler, Sampler) and not isinstance(sampler, BeamSearch):
        raise InvalidArgument(f"sampler must be a labkit sampler (e.g. labkit.sampling.Classic()), a spec string "
                              f"(e.g. 'classic:temperature=0.7') or None for greedy; got {type(sampler).__name__}")
    return sampler


def _beam(beam: Any) -> BeamSearch | None:
    if beam is None or isinstance(beam, BeamSearch):
        return beam
    if isinstance(beam, int) and not isinstance(beam, bool):
        return BeamSearch(num_beams=beam)
    raise InvalidArgument(f"beam must be a labkit.sampling.BeamSearch(...), a number of beams, or None; got {beam!r}")


def _names(what: str, names: Any) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        if what == "capture":
            raise InvalidArgument(f"capture must be a list of names from {list(CAPTURES)} and hook-site names; got "
                                  f"{names!r}")
        raise InvalidArgument(f"{what} must be a list of registered metric names; got {names!r}")
    if what == "capture":
        for name in names:
            if name not in CAPTURES and (not isinstance(name, str) or not name.startswith(("blocks.", "embed",
                                                                                           "final_norm"))):
                raise InvalidArgument(f"capture must be a list of names from {list(CAPTURES)} and hook-site names "
                                      f"such as 'blocks.0.resid_post' (list(session.sites)); got {name!r}")
    return tuple(names)


@dataclass
class Run:
    """One generation as its driver receives it: the settings, the model, and what the Session set up for it."""

    settings: GenerationSettings
    model: Any
    tokenizer: Any
    prompt_ids: torch.Tensor
    """Shape (1, T)."""
    traces: list[Trace]
    """One per row, filled by the driver."""
    rules: StopRules
    generators: list[torch.Generator | None]
    """One per row."""
    interventions: Sequence[Any] = ()
    """The token-level interventions, scoped ones first (activation-level ones are hooks, already attached)."""
    session: Any = None
    """Handed to the interventions' context."""
    stop_event: threading.Event = field(default_factory=threading.Event)
    token_text: TokenTexts | None = None
    images: Any = None
    """The prompt's images (a :class:`labkit.model.vlm.ImagePrompt`) for a vision-language model, else None."""
    features: tuple[Any, ...] = ()
    """SAEs given in ``capture``: each Step gets their top features (``captures["features:<name>"]``)."""

    def __post_init__(self) -> None:
        if self.token_text is None:
            self.token_text = TokenTexts(self.tokenizer)
