"""The samplers by name, and samplers from short specs.

Spec syntax (CLI ``--sampler``, sweeps, magics: :func:`parse_sampler`): ``name`` or ``name:key=value,key=value``,
e.g. ``greedy``, ``classic:temperature=0.7,top_p=0.9``, ``mirostat:tau=4``, ``entropy_guided``,
``entropix:temperature=0.5``, ``beam:num_beams=4``, ``contrastive:alpha=0.1,beta=0.5,amateur=layers:8``,
``dola:layers=high``, ``contrastive-search:penalty_alpha=0.6,top_k=4``. A new sampler is added to :data:`SAMPLERS`.
"""

from __future__ import annotations

from labkit.core.errors import InvalidArgument
from labkit.core.specs import parse_spec
from labkit.sampling.base import Classic, Greedy, Sampler
from labkit.sampling.beam import BeamSearch
from labkit.sampling.contrastive import ContrastiveDecoding, ContrastiveSearch, DoLa
from labkit.sampling.entropix import Entropix
from labkit.sampling.guided import EntropyGuided
from labkit.sampling.mirostat import Mirostat

#: Sampler classes by spec name (``-`` and ``_`` are the same in specs).
SAMPLERS: dict[str, type[Sampler]] = {
    "greedy": Greedy, "classic": Classic, "mirostat": Mirostat, "entropy_guided": EntropyGuided, "entropix": Entropix,
    "beam": BeamSearch, "contrastive": ContrastiveDecoding, "dola": DoLa, "contrastive_search": ContrastiveSearch,
}


def parse_sampler(spec: str) -> Sampler:
    """A sampler from ``name[:key=value,...]`` (names: see ``SAMPLERS``; ``-`` and ``_`` are the same)."""
    name, kwargs = parse_spec(spec, "sampler")
    key = name.lower().replace("-", "_")
    if key not in SAMPLERS:
        raise InvalidArgument(f"sampler {name!r} is unknown; choose from {sorted(SAMPLERS)}")
    try:
        return SAMPLERS[key](**kwargs)
    except TypeError as e:
        raise InvalidArgument(f"sampler {key!r} does not take {sorted(kwargs)}: {e}") from None


def label(sampler: Sampler) -> str:
    """A short display name: the name and the settings that differ from the defaults."""
    cfg = sampler.config()
    defaults = type(sampler)().config()
    changed = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg.items()
                       if k != "name" and defaults.get(k) != v)
    return f"{cfg['name']}:{changed}" if changed else cfg["name"]
