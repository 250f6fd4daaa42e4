"""The samplers by name, and samplers from short specs.

Spec syntax (CLI ``--sampler``, sweeps, magics: :func:`parse_sampler`): ``name`` or ``name:key=value,key=value``,
e.g. ``greedy``, ``classic:temperature=0.7,top_p=0.9``, ``mirostat:tau=4``, ``entropy_guided``,
``entropix:temperature=0.5``, ``beam:num_beams=4``, ``contrastive:alpha=0.1,beta=0.5,amateur=layers:8``,
``dola:layers=high``, ``contrastive-search:penalty_alpha=0.6,top_k=4``. A new sampler is added with
:func:`register`.
"""

from __future__ import annotations

from typing import Any

from labkit.core.errors import InvalidArgument
from labkit.core.specs import parse_spec
from labkit.sampling.base import Classic, Greedy, Sampler
from labkit.sampling.beam import BeamSearch
from labkit.sampling.contrastive import ContrastiveDecoding, ContrastiveSearch, DoLa
from labkit.sampling.entropix import Entropix
from labkit.sampling.guided import EntropyGuided
from labkit.sampling.mirostat import Mirostat
from labkit.sampling.params import Tunable

SAMPLERS: dict[str, type[Tunable]] = {
    "greedy": Greedy, "classic": Classic, "mirostat": Mirostat, "entropy_guided": EntropyGuided, "entropix": Entropix,
    "beam": BeamSearch, "contrastive": ContrastiveDecoding, "dola": DoLa, "contrastive_search": ContrastiveSearch,
}
"""What decides the next token, by spec name (``-`` and ``_`` are the same in specs): the samplers, and beam search
(a decoding strategy: ``generate(beam=...)``). Open: :func:`register` adds one, and the Lab's sampler box, the
command line's ``--sampler``, sweeps and spec strings accept it as they accept the built-in ones."""


def register(cls: type[Tunable], name: str | None = None) -> type[Tunable]:
    """Add a sampler class (a :class:`~labkit.sampling.base.Sampler` subclass whose ``params`` declare its
    parameters) under ``name`` (default: ``cls.name``); returns ``cls``, so it works as a class decorator."""
    if not isinstance(cls, type) or not issubclass(cls, (Sampler, BeamSearch)):
        raise InvalidArgument(f"register takes a labkit Sampler subclass; got {cls!r}")
    key = (name or cls.name).lower().replace("-", "_")
    if not key.isidentifier():
        raise InvalidArgument(f"a sampler's name must be letters, digits and _ (spec syntax); got {key!r}")
    SAMPLERS[key] = cls
    return cls


def name_of(sampler: Tunable) -> str:
    """The registry name of a sampler object's class (InvalidArgument when its class is not registered)."""
    for key, cls in SAMPLERS.items():
        if type(sampler) is cls:
            return key
    raise InvalidArgument(f"sampler class {type(sampler).__name__} is not registered; call "
                          f"labkit.sampling.register({type(sampler).__name__}) (registered: {sorted(SAMPLERS)})")


def check_param(key: str, value: Any) -> Any:
    """Check one parameter by its name against the first registered class that declares it (kept for code that
    checks a value before choosing a sampler); unknown names pass through."""
    for cls in SAMPLERS.values():
        if key in cls.params:
            return cls.params[key].check(key, value)
    return value


def parse_sampler(spec: str) -> Any:
    """A sampler from ``name[:key=value,...]`` (names: see ``SAMPLERS``; ``-`` and ``_`` are the same)."""
    name, kwargs = parse_spec(spec, "sampler")
    key = name.lower().replace("-", "_")
    if key not in SAMPLERS:
        raise InvalidArgument(f"sampler {name!r} is unknown; choose from {sorted(SAMPLERS)}")
    try:
        return SAMPLERS[key](**kwargs)
    except TypeError as e:
        raise InvalidArgument(f"sampler {key!r} does not take {sorted(kwargs)}: {e}") from None


def label(sampler: Tunable) -> str:
    """A short display name: the name and the settings that differ from the defaults."""
    cfg = sampler.config()
    defaults = type(sampler)().config()
    changed = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg.items()
                       if k != "name" and defaults.get(k) != v)
    return f"{cfg['name']}:{changed}" if changed else cfg["name"]
