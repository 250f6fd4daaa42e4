"""Results of looking at a model: one next-token :class:`~labkit.records.results.Distribution`, and the :class:`Trace`
of a
generation.

A Trace is a list of :class:`Step` plus :class:`TraceMeta`. It saves to JSON or Parquet (chosen by the
file suffix) and loads back losslessly; any other file raises :class:`~labkit.core.errors.TraceFormatError`.
Log-probabilities are natural logs (nats); entropies are in bits; varentropies in bits².
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from labkit.core.errors import InvalidArgument, TraceFormatError
from labkit.core.files import atomic_path, check_target

if TYPE_CHECKING:
    import pandas as pd

FORMAT = "labkit.trace"  # the file format's name (not the module path)
FORMAT_VERSION = 1
STOP_REASONS = ("", "max_new_tokens", "eos", "stop_token", "stop_string", "stopped", "interrupted", "error")


class Alternative(NamedTuple):
    """One candidate token: ``(token_text, token_id, prob)``; prob is a raw probability in [0, 1]."""

    token: str
    token_id: int
    prob: float


@dataclass
class Step:
    """One generated token and what the model thought when it chose it.

    Metrics are computed from the model's **raw** logits: before token-level interventions and the sampler
    (activation-level interventions, being part of the model's forward pass, are already in them). ``sampler``
    records what the sampler did; ``interventions`` which token-level interventions changed the step's logits.
    """

    index: int
    """Step number within the generation, from 0."""
    position: int
    """Absolute position of this token in the sequence (prompt length + index)."""
    token_id: int
    """Vocabulary id of the chosen token."""
    token: str
    """Display text of the chosen token (``tokenizer.decode([token_id])``)."""
    logprob: float
    """Raw natural-log probability of the chosen token (nats, ≤ 0)."""
    entropy_bits: float
    """Entropy of the raw next-token distribution (bits, ≥ 0)."""
    varentropy_bits: float
    """Varentropy of the raw distribution: variance of the surprisal (bits², ≥ 0)."""
    top: list[Alternative]
    """Shape (k,): the raw top-k alternatives, most probable first."""
    time_ms: float
    """Wall time of the step: forward pass, metrics and sampling (milliseconds)."""
    sampler: dict[str, Any] = field(default_factory=dict)
    """The sampler's own record of what it did at this step (empty for greedy)."""
    attention: dict[str, float] = field(default_factory=dict)
    """With ``capture=["attention"]``: the step's attention summary — mean head entropy (bits), varentropy across
    heads (bits²), agreement, interaction strength (see :mod:`labkit.measures.attention`). Empty otherwise."""
    interventions: list[str] = field(default_factory=list)
    """Token-level interventions that changed this step's logits, e.g. ``["Suppress([' Paris'])"]``."""
    speculative: dict[str, Any] = field(default_factory=dict)
    """With speculative decoding: ``round``, ``origin`` (``"accepted"`` a drafted token the target kept,
    ``"resampled"`` drawn by the target after rejecting ``rejected``, ``"bonus"`` drawn by the target after all
    drafts were kept, ``"target"`` drawn by the target in a round with nothing drafted), ``p`` and ``q`` (target and
    draft probabilities of the token after the sampler) and, on a round's first step, ``drafted``. Empty otherwise."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Registered metrics (:func:`labkit.measures.information.register`) of this step's raw distribution, those named in
    ``generate(metrics=[...])``; each metric's unit is in its registration
    (``labkit.measures.information.metric(name).unit``)."""
    kv: dict[str, Any] = field(default_factory=dict)
    """With ``generate(kv=...)``: the cache policy's ``spec`` and the ``bytes`` its cache holds after this step (all
    layers, :func:`labkit.decoding.kv.cache_bytes`). Empty otherwise."""
    captures: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Raw tensors captured at this step, e.g. ``"attention"`` -> AttentionRow (L, H, T_k). Kept in memory only:
    ``Trace.save`` stores the summaries, not these tensors."""

    def __post_init__(self) -> None:
        self.top = [Alternative(str(t), int(i), float(p)) for t, i, p in self.top]
        if self.index < 0 or self.position < self.index:
            raise InvalidArgument(f"Step index/position must satisfy 0 ≤ index ≤ position; got {self.index}, "
                                  f"{self.position}")
        if not self.logprob <= 1e-6:
            raise InvalidArgument(f"Step.logprob is a log-probability and must be ≤ 0; got {self.logprob}")
        if not (self.entropy_bits >= -1e-4 and self.varentropy_bits >= -1e-4):
            raise InvalidArgument("Step entropy_bits and varentropy_bits must be ≥ 0; got "
                                  f"{self.entropy_bits}, {self.varentropy_bits}")

    @property
    def prob(self) -> float:
        """Raw probability of the chosen token, in [0, 1]."""
        return math.exp(self.logprob)

    @property
    def surprisal_bits(self) -> float:
        """Surprisal −log₂ p of the chosen token (bits)."""
        return -self.logprob / math.log(2.0)


@dataclass
class TraceMeta:
    """How a Trace was produced."""

    model: str
    dtype: str
    device: str
    sampler: dict[str, Any]
    """Sampler name and configuration at the start of the run (each Step records what was used)."""
    seed: int | None
    max_new_tokens: int
    chat: bool = False
    stop: list[str | int] = field(default_factory=list)
    labkit_version: str = ""
    created: str = ""
    """ISO-8601 UTC time the generation started."""
    speculative: dict[str, Any] = field(default_factory=dict)
    """With speculative decoding: the draft's settings and the run's SpeculativeStats (``as_dict``); else empty."""
    beam: dict[str, Any] = field(default_factory=dict)
    """With beam search: the tree of hypotheses (``labkit.records.beam_tree.BeamTree.as_dict()``); else empty."""


@dataclass
class Trace:
    """A generation: the prompt, the generated steps and how they were produced."""

    prompt: str
    prompt_ids: list[int]
    """Shape (T,): the token ids fed to the model (after any chat template)."""
    steps: list[Step]
    meta: TraceMeta
    text: str = ""
    """Generated text, decoded from all generated ids with special tokens skipped."""
    stop_reason: str = ""
    """Why generation ended: one of ``STOP_REASONS`` ("" while still running)."""
    images: dict[str, Any] = field(default_factory=dict)
    """A vision-language prompt's image tokens: {"positions", "image", "row", "col": one entry per image token,
    "grids": (rows, columns) per image} (``labkit.model.vlm.ImagePositions.as_dict``); empty for a text prompt."""

    def __post_init__(self) -> None:
        if self.stop_reason not in STOP_REASONS:
            raise InvalidArgument(f"stop_reason must be one of {STOP_REASONS}; got {self.stop_reason!r}")

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        return iter(self.steps)

    def __getitem__(self, i: int) -> Step:
        return self.steps[i]

    @property
    def token_ids(self) -> list[int]:
        """Shape (n,): the generated token ids."""
        return [s.token_id for s in self.steps]

    @property
    def tokens(self) -> list[str]:
        """Shape (n,): the generated tokens' display texts."""
        return [s.token for s in self.steps]

    def __repr__(self) -> str:
        return (f"Trace({len(self.steps)} steps, stop_reason={self.stop_reason!r}, model={self.meta.model!r}, "
                f"text={self.text[:60]!r}{'…' if len(self.text) > 60 else ''})")

    def _repr_html_(self) -> str:
        """Coloured tokens (static HTML, for exports); the live view is ``labkit.ui.panels.TokenStream(trace)``."""
        from labkit.records.render import trace_html

        return trace_html(self)

    def beam_tree(self) -> Any:
        """The tree of hypotheses of a beam search (:class:`labkit.records.beam_tree.BeamTree`); refused for other
        runs."""
        from labkit.records.beam_tree import BeamTree

        if not self.meta.beam:
            raise InvalidArgument("this trace was not made by beam search (sampler=BeamSearch(...)): no beam tree")
        return BeamTree.from_dict(self.meta.beam)

    # -- why ----------------------------------------------------------------------------------------------
    def attribute(self, index: int, method: str = "ig", session: Any = None, **options: Any) -> Any:
        """Why step ``index``'s token came out: its attribution to the prompt and the tokens before it
        (``Session.attribute_step``; ``options``: foil, target, quantity, steps, batch, baseline). ``session``
        defaults to the one that generated this Trace (pass it for a Trace loaded from a file)."""
        return self._session_for(session).attribute_step(self, index, method=method, **options)

    def logit_attribution(self, index: int, against: str | int | None = None, session: Any = None) -> Any:
        """Direct logit attribution of step ``index``'s token (``Session.logit_attribution_step``)."""
        return self._session_for(session).logit_attribution_step(self, index, against=against)

    def _session_for(self, session: Any) -> Any:
        if session is None:
            owner = getattr(self, "_owner", None)
            session = owner() if owner is not None else None
        if session is None:
            raise InvalidArgument("this Trace has no Session (it was loaded from a file, or its Session was freed): "
                                  "pass session=labkit.Session(...) holding the model that generated it")
        return session

    # -- tables -----------------------------------------------------------------------------------------
    def to_pandas(self) -> pd.DataFrame:
        """One row per step: token, prob, logprob (nats), surprisal/entropy (bits), varentropy (bits²), ..."""
        import pandas as pd

        rows = []
        for s in self.steps:
            rows.append({
                "step": s.index, "position": s.position, "token": s.token, "token_id": s.token_id,
                "prob": s.prob, "logprob": s.logprob, "surprisal_bits": s.surprisal_bits,
                "entropy_bits": s.entropy_bits, "varentropy_bits": s.varentropy_bits,
                "top": [f"{a.token!r}:{a.prob:.3f}" for a in s.top], "time_ms": s.time_ms,
                **{f"sampler.{k}": v for k, v in s.sampler.items()},
                **{f"speculative.{k}": s.speculative[k] for k in ("round", "origin") if k in s.speculative},
                **{f"metric.{k}": v for k, v in s.metrics.items()},
                **({"kv_bytes": s.kv["bytes"]} if "bytes" in s.kv else {}),
            })
        columns = ["step", "position", "token", "token_id", "prob", "logprob", "surprisal_bits", "entropy_bits",
                   "varentropy_bits", "top", "time_ms"]
        return pd.DataFrame(rows, columns=None if rows else columns)

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the trace to ``path``: ``.json`` or ``.parquet`` (by suffix). Returns the path.

        Atomic (:func:`labkit.core.files.atomic_path`): a failed write leaves the previous file untouched and no partial
        file; it raises SaveError (OSError) naming the path, InvalidArgument for a bad path, TraceFormatError for
        content that cannot be serialised (e.g. a sampler record that is not JSON)."""
        path = check_target(path)
        kind = format_of(path)
        try:
            text = json.dumps(self._header() | {"steps": [_step_to_dict(s) for s in self.steps]},
                              ensure_ascii=False, indent=1) if kind == "json" else None
        except (TypeError, ValueError) as e:
            raise TraceFormatError(f"cannot save the trace to {str(path)!r}: a field is not JSON-serialisable "
                                   f"({e})") from e
        with atomic_path(path) as tmp:
            if text is not None:
                tmp.write_text(text, encoding="utf-8")
            else:
                _save_parquet(self, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace written by :meth:`save` (``.json`` or ``.parquet``)."""
        if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
            raise InvalidArgument(f"path must be a file path (str or pathlib.Path); got {path!r}")
        path = Path(path)
        kind = format_of(path)
        if not path.is_file():
            raise TraceFormatError(f"no trace file at {str(path)!r}")
        try:
            if kind == "json":
                data = json.loads(path.read_text(encoding="utf-8"))  # as save writes it, whatever the locale
                if not isinstance(data, dict):
                    raise TraceFormatError(f"{str(path)!r} is not a labkit trace (top level is not an object)")
                steps = data.get("steps")
            else:
                data, steps = _load_parquet(path)
            _check_header(data, path)
            return cls._from_parts(data, steps, path)
        except TraceFormatError:
            raise
        except Exception as e:  # malformed JSON / Parquet / fields: one clear error
            raise TraceFormatError(f"{str(path)!r} is not a readable labkit trace: {type(e).__name__}: {e}") from e

    def _header(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "prompt": self.prompt, "prompt_ids": self.prompt_ids,
                "text": self.text, "stop_reason": self.stop_reason, "meta": dataclasses.asdict(self.meta),
                "images": self.images}

    @classmethod
    def _from_parts(cls, header: dict[str, Any], steps: Any, path: Path) -> Trace:
        if not isinstance(steps, list):
            raise TraceFormatError(f"{str(path)!r}: 'steps' must be a list")
        _check_types(cls, {k: v for k, v in header.items() if k not in ("format", "version", "steps")},
                     f"{str(path)!r}", skip=("meta",))
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in header["prompt_ids"]):
            raise TraceFormatError(f"{str(path)!r}: prompt_ids must be a list of integers")
        _check_types(TraceMeta, header["meta"], f"{str(path)!r} meta")
        for i, step in enumerate(steps):
            _check_types(Step, step, f"{str(path)!r} step {i}", skip=("captures",))
        return cls(prompt=header["prompt"], prompt_ids=list(header["prompt_ids"]),
                   steps=[Step(**s) for s in steps], meta=TraceMeta(**header["meta"]),
                   text=header["text"], stop_reason=header["stop_reason"], images=header.get("images") or {})


def format_of(path: Path) -> str:
    """Return "json" or "parquet" from the suffix of ``path``; anything else raises InvalidArgument."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise InvalidArgument(f"trace path must end in .json or .parquet; got {str(path)!r}")


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                       "list": (list, tuple), "dict": (dict,)}


def _check_types(cls: type, data: Any, where: str, skip: tuple[str, ...] = ()) -> None:
    """TraceFormatError unless ``data`` is a mapping whose entries have the types of ``cls``'s dataclass fields
    (read from the annotations: ``int``, ``float``, ``str``, ``bool``, ``list[...]``, ``dict[...]``, ``X | None``);
    unknown keys are an error too, missing keys are left to the dataclass's defaults."""
    if not isinstance(data, dict):
        raise TraceFormatError(f"{where} must be an object; got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TraceFormatError(f"{where} has unknown fields {unknown}")
    for name, value in data.items():
        if name in skip:
            continue
        options = [a.strip() for a in str(fields[name].type).split("|")]
        allowed: tuple[type, ...] = ()
        for option in options:
            base = option.split("[", 1)[0]
            allowed += (type(None),) if base == "None" else _TYPES.get(base, (object,))
        bad = isinstance(value, bool) and bool not in allowed
        if bad or not isinstance(value, allowed):
            raise TraceFormatError(f"{where}: field {name!r} must be {' or '.join(options)}; got {value!r}")


def _check_header(data: dict[str, Any], path: Path) -> None:
    if data.get("format") != FORMAT:
        raise TraceFormatError(f"{str(path)!r} is not a labkit trace (format is {data.get('format')!r}, "
                               f"expected {FORMAT!r})")
    if data.get("version") != FORMAT_VERSION:
        raise TraceFormatError(f"{str(path)!r} has trace format version {data.get('version')!r}; this labkit "
                               f"reads version {FORMAT_VERSION}")


_NOT_SAVED = ("captures",)


def _step_to_dict(step: Step) -> dict[str, Any]:
    d = {f.name: getattr(step, f.name) for f in dataclasses.fields(step) if f.name not in _NOT_SAVED}
    d["top"] = [list(a) for a in step.top]
    return d


# Arrow type of each Step field. A new Step field must be added here (a test checks they agree).
def _arrow_types() -> dict[str, Any]:
    import pyarrow as pa

    return {
        "index": pa.int64(), "position": pa.int64(), "token_id": pa.int64(), "token": pa.string(),
        "logprob": pa.float64(), "entropy_bits": pa.float64(), "varentropy_bits": pa.float64(),
        "top": pa.list_(pa.struct([("token", pa.string()), ("token_id", pa.int64()), ("prob", pa.float64())])),
        "time_ms": pa.float64(),
        "sampler": pa.string(),  # JSON text: a sampler's record may hold any JSON value
        "attention": pa.string(),  # JSON text
        "interventions": pa.list_(pa.string()),
        "speculative": pa.string(),  # JSON text
        "metrics": pa.string(),  # JSON text
        "kv": pa.string(),  # JSON text
    }


_JSON_COLUMNS = ("sampler", "attention", "speculative", "metrics", "kv")


def _save_parquet(trace: Trace, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = _arrow_types()
    columns: dict[str, list[Any]] = {name: [] for name in types}
    for s in trace.steps:
        d = _step_to_dict(s)
        for name in types:
            v = d[name]
            if name in _JSON_COLUMNS:
                v = json.dumps(v, ensure_ascii=False)
            elif name == "top":
                v = [{"token": t, "token_id": i, "prob": p} for t, i, p in v]
            columns[name].append(v)
    schema = pa.schema([(n, t) for n, t in types.items()],
                       metadata={FORMAT.encode(): json.dumps(trace._header(), ensure_ascii=False).encode()})
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), path)


def _load_parquet(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = (table.schema.metadata or {}).get(FORMAT.encode())
    if meta is None:
        raise TraceFormatError(f"{str(path)!r} is a Parquet file but not a labkit trace (no {FORMAT!r} metadata)")
    header = json.loads(meta)
    steps = table.to_pylist()
    for s in steps:
        for name in _JSON_COLUMNS:
            if name in s:  # traces written before a column existed load with its default
                s[name] = json.loads(s[name])
        s["top"] = [(a["token"], a["token_id"], a["prob"]) for a in s["top"]]
    return header, steps
