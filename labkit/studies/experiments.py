"""Sweeps: prompts × samplers × interventions × KV-cache policies × seeds, one row per cell, locally or on Ray.

A row holds the cell (prompt, sampler, intervention, seed), the generated text, mean/max entropy and varentropy
(bits, bits²) of the raw next-token distributions, the perplexity of the output under the unmodified model, the KL
(bits) to the baseline, and the chosen registered metrics (:func:`labkit.measures.information.metrics`, mean over the
steps).

The baseline of a cell is the same prompt and seed with no intervention, i.e. the unmodified model:
``kl_to_baseline_bits`` is the mean over the cell's steps of KL(the cell's next-token distribution after its
interventions, before the sampler ‖ the unmodified model's distribution at the same context, with the full KV
cache). It is 0 for cells without interventions and with the full cache; a cell's KV-cache policy (the ``kv`` axis,
:mod:`labkit.decoding.kv`) counts in, so for a policy alone it is the information the cache loses. ``kv_bytes`` is the
cache's
size after the last step. Registered metrics are computed on that same intervened distribution.

Results stream into ``out`` (a Parquet dataset: a folder of part files, ``pandas.read_parquet(out)`` reads it)
as cells finish, so an interrupted sweep keeps every finished row; ``resume=True`` skips the cells already there.
On Ray, each actor loads one Session once and takes cells from a queue (``ray.util.ActorPool``); a killed actor
is restarted and its cell retried (``max_restarts``, ``max_task_retries``), and rows are keyed by cell, so each
cell appears once.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from labkit.core.errors import InvalidArgument, check_int, invalid_choice
from labkit.core.extras import require
from labkit.core.files import atomic_path
from labkit.measures import information as info

EXECUTORS = ("local", "ray")
BASE_COLUMNS = ("cell", "prompt", "sampler", "intervention", "kv", "seed", "text", "tokens", "mean_entropy_bits",
                "max_entropy_bits", "mean_varentropy_bits", "max_varentropy_bits", "perplexity",
                "kl_to_baseline_bits", "kv_bytes", "stop_reason")
"""Columns of every row (then one ``<metric>`` column per chosen metric, then ``worker``: the process id)."""


@dataclass(frozen=True)
class Cell:
    """One point of a sweep: names of the sampler and the intervention set, and the seed."""

    prompt: str
    sampler: str
    intervention: str
    seed: int
    kv: str = "full"
    """The name of the cell's KV-cache policy in ``Sweep.kv``."""

    @property
    def key(self) -> str:
        """Stable id of the cell (a hash of its fields; the default cache is left out, so sweeps written before the
        ``kv`` axis resume), the row's ``cell`` column."""
        fields = [self.prompt, self.sampler, self.intervention, self.seed] + ([] if self.kv == "full" else [self.kv])
        return hashlib.sha1(json.dumps(fields).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SessionSpec:
    """How each worker loads its Session (picklable; a Ray actor loads it once)."""

    model: str = "default"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    """torch threads in a worker (None: leave torch's default)."""

    def load(self) -> Any:
        """A Session from this spec (torch's thread count set first when ``threads`` is given)."""
        from labkit.session import Session

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return Session(self.model, device=self.device, dtype=self.dtype, progress=False)


class Sweep:
    """``Sweep(prompts, samplers={name: sampler}, interventions={name: [..]}, seeds=[...], max_new_tokens=...,
    metrics=[...])``: the cartesian product of cells.

    Samplers are labkit samplers or spec strings (``"classic:temperature=0.7"``; None = greedy); interventions are
    lists of labkit interventions or recipe specs (``"topic-boost:words=science,factor=4"``, see ``labkit
    recipes``), resolved against each worker's Session. Defaults: ``{"greedy": None}`` and ``{"none": []}``.
    """

    def __init__(self, prompts: Sequence[str], samplers: Mapping[str, Any] | None = None,
                 interventions: Mapping[str, Sequence[Any]] | None = None, seeds: Sequence[int] = (0,),
                 max_new_tokens: int = 32, metrics: Sequence[str] = (), chat: bool = False,
                 kv: Mapping[str, Any] | None = None) -> None:
        from labkit.decoding.kv import parse_kv
        from labkit.sampling import Tunable, parse_sampler

        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise InvalidArgument(f"prompts must be a non-empty list of non-empty strings; got {prompts!r}")
        samplers = dict(samplers) if samplers is not None else {"greedy": None}
        for name, s in samplers.items():
            if isinstance(s, str):
                samplers[name] = parse_sampler(s)
            elif s is not None and not isinstance(s, Tunable):
                raise InvalidArgument(f"samplers[{name!r}] must be a labkit sampler, a sampler spec or None; got "
                                      f"{type(s).__name__}")
        interventions = dict(interventions) if interventions is not None else {"none": []}
        for name, items in interventions.items():
            if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
                raise InvalidArgument(f"interventions[{name!r}] must be a list (of interventions or recipe specs); "
                                      f"got {items!r}")
        if not samplers or not interventions:
            raise InvalidArgument("samplers and interventions must each have at least one entry")
        if isinstance(seeds, int) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                          and s >= 0 for s in seeds):
            raise InvalidArgument(f"seeds must be a non-empty list of non-negative integers; got {seeds!r}")
        check_int("max_new_tokens", max_new_tokens, 1)
        for m in metrics:
            info.metric(m)  # unknown names list the registered ones
        kv = dict(kv) if kv is not None else {"full": "full"}
        if not kv:
            raise InvalidArgument("kv must name at least one cache policy, e.g. {'full': 'full'}")
        self.kv = {name: parse_kv(spec) for name, spec in kv.items()}  # a bad spec fails here
        self.prompts, self.samplers, self.interventions = list(prompts), samplers, interventions
        self.seeds, self.max_new_tokens, self.metrics, self.chat = list(seeds), max_new_tokens, list(metrics), chat

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Sweep:
        """A Sweep from a mapping (e.g. a parsed YAML file; keys as the constructor's arguments)."""
        allowed = {"prompts", "samplers", "interventions", "seeds", "max_new_tokens", "metrics", "chat", "kv"}
        unknown = set(config) - allowed - {"executor", "workers", "out", "session"}
        if unknown:
            raise InvalidArgument(f"unknown sweep settings {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**{k: v for k, v in config.items() if k in allowed})

    def cells(self) -> list[Cell]:
        """Every cell of the grid: prompts × samplers × interventions × KV policies × seeds, seeds innermost."""
        return [Cell(p, s, i, seed, kv) for p in self.prompts for s in self.samplers for i in self.interventions
                for kv in self.kv for seed in self.seeds]

    def __len__(self) -> int:
        return len(self.prompts) * len(self.samplers) * len(self.interventions) * len(self.kv) * len(self.seeds)

    def __repr__(self) -> str:
        kv = f" × {len(self.kv)} KV policies" if len(self.kv) > 1 else ""
        return (f"Sweep({len(self.prompts)} prompts × {len(self.samplers)} samplers × {len(self.interventions)} "
                f"interventions{kv} × {len(self.seeds)} seeds = {len(self)} cells, {self.max_new_tokens} tokens)")

    # -- one cell ------------------------------------------------------------------------------------------
    def run_cell(self, session: Any, cell: Cell, resolved: dict[str, list[Any]] | None = None) -> dict[str, Any]:
        """Generate one cell on ``session`` and measure it (see the module docstring); ``resolved`` caches the
        interventions bound to this session by name."""
        return self.run_cells(session, [cell], resolved)[0]

    def run_cells(self, session: Any, cells: Sequence[Cell], resolved: dict[str, list[Any]] | None = None
                  ) -> list[dict[str, Any]]:
        """Cells that differ only in their seed, generated as one batch (row b is the single run with its seed, so
        each row is what :meth:`run_cell` gives; beam search, deterministic, runs once per cell) and measured."""
        from labkit.interventions.specs import parse
        from labkit.sampling.beam import BeamSearch, strategy_arguments

        first = cells[0]
        if any((c.prompt, c.sampler, c.intervention, c.kv) != (first.prompt, first.sampler, first.intervention,
                                                               first.kv) for c in cells):
            raise InvalidArgument("run_cells takes cells that differ only in their seed")
        resolved = {} if resolved is None else resolved
        if first.intervention not in resolved:
            resolved[first.intervention] = [x for item in self.interventions[first.intervention]
                                            for x in (parse(session, item) if isinstance(item, str) else [item])]
        items = resolved[first.intervention]
        sampler = copy.deepcopy(self.samplers[first.sampler])  # a fresh one: state never leaks between cells
        policy = self.kv[first.kv]
        kw = dict(max_new_tokens=self.max_new_tokens, chat=self.chat, interventions=items, capture=["logits"],
                  kv=policy)
        if len(cells) > 1 and policy.spec == "full" and not isinstance(sampler, BeamSearch):
            traces = session.generate(first.prompt, **strategy_arguments(sampler), seed=[c.seed for c in cells], **kw)
        else:
            traces = [session.generate(first.prompt, **strategy_arguments(copy.deepcopy(sampler)),
                                       seed=c.seed, **kw)
                      for c in cells]
        return [self._row(session, cell, trace, items, policy.spec == "full")
                for cell, trace in zip(cells, traces, strict=True)]

    def _row(self, session: Any, cell: Cell, trace: Any, items: list[Any], full: bool) -> dict[str, Any]:
        """The row of one generated cell: its figures, and the teacher-forced comparison with the baseline."""
        from labkit.interventions.effects import unmodified_logits

        n = len(trace)
        row: dict[str, Any] = {"cell": cell.key, "prompt": cell.prompt, "sampler": cell.sampler,
                               "intervention": cell.intervention, "kv": cell.kv, "seed": cell.seed,
                               "text": trace.text, "tokens": n, "stop_reason": trace.stop_reason,
                               "kv_bytes": trace.steps[-1].kv["bytes"] if n else 0}
        h = torch.tensor([s.entropy_bits for s in trace.steps], dtype=torch.float64)
        v = torch.tensor([s.varentropy_bits for s in trace.steps], dtype=torch.float64)
        nan = float("nan")
        row |= {"mean_entropy_bits": float(h.mean()) if n else nan, "max_entropy_bits": float(h.max()) if n else nan,
                "mean_varentropy_bits": float(v.mean()) if n else nan,
                "max_varentropy_bits": float(v.max()) if n else nan}
        if n:
            with session.exclusive(), torch.inference_mode():
                p = unmodified_logits(session, trace.prompt_ids, trace.token_ids)  # (n, V)
            q = torch.stack([s.captures["logits"].float().cpu() for s in trace.steps])  # (n, V) after interventions
            chosen = info.log_probs(p).gather(-1, torch.tensor(trace.token_ids)[:, None])[:, 0]  # (n,) nats
            row["perplexity"] = float(info.perplexity(chosen))
            changed = bool(items) or not full
            row["kl_to_baseline_bits"] = float(info.kl_divergence(q, p, "bits").mean()) if changed else 0.0
            for m in self.metrics:
                row[m] = float(info.metric(m).fn(q).double().mean())
        else:
            row |= {"perplexity": nan, "kl_to_baseline_bits": nan, **{m: nan for m in self.metrics}}
        row["worker"] = os.getpid()
        return row

    # -- the whole sweep -------------------------------------------------------------------------------------
    def run(self, session: Any = None, executor: str = "local", workers: int = 2, num_gpus: float = 0,
            out: str | os.PathLike[str] | None = None, resume: bool = False, progress: bool = True,
            session_spec: SessionSpec | None = None, on_row: Callable[[dict[str, Any]], None] | None = None) -> Any:
        """Run every cell; returns a DataFrame with one row per cell, in cell order.

        ``executor="local"`` runs on ``session`` (a Session; loaded from ``session_spec`` when None) with a
        progress bar. ``executor="ray"`` starts ``workers`` Ray actors (``num_gpus`` each; torch threads from
        ``session_spec.threads``, default 1) unless a Ray cluster is already initialised. ``out``: the Parquet
        dataset rows are appended to as they finish; ``resume=True`` keeps the rows there and runs only the
        missing cells (without it, an existing ``out`` is an error). ``on_row(row)`` is called on each new row.
        """
        import pandas as pd

        if executor not in EXECUTORS:
            raise invalid_choice("executor", executor, EXECUTORS)
        if executor == "ray":
            require("ray", "sweeps on Ray (executor='ray')", "ray")
        check_int("workers", workers, 1)
        if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)) or num_gpus < 0:
            raise InvalidArgument(f"num_gpus must be a number ≥ 0; got {num_gpus!r}")
        sink = _Sink(out, resume)
        todo = [c for c in self.cells() if c.key not in sink.done]
        bar = _progress(len(self), len(self) - len(todo), progress)
        try:
            if todo:
                results = (self._local(session, session_spec, todo) if executor == "local" else
                           self._ray(session_spec, todo, workers, num_gpus))
                for row in results:
                    sink.add(row)
                    bar.update(1)
                    if on_row is not None:
                        on_row(row)
        finally:
            sink.close()
            bar.close()
        rows = {r["cell"]: r for r in sink.rows}
        order = [c.key for c in self.cells() if c.key in rows]
        return pd.DataFrame([rows[k] for k in order])

    def _local(self, session: Any, spec: SessionSpec | None, cells: list[Cell]) -> Iterator[dict[str, Any]]:
        """Rows of ``cells``; consecutive cells that differ only in their seed are one batched generation."""
        session = session if session is not None else (spec or SessionSpec()).load()
        resolved: dict[str, list[Any]] = {}
        for group in _seed_groups(cells):
            yield from self.run_cells(session, group, resolved)

    def _ray(self, spec: SessionSpec | None, cells: list[Cell], workers: int,
             num_gpus: float) -> Iterator[dict[str, Any]]:
        import ray
        from ray.util import ActorPool

        spec = spec or SessionSpec(threads=1)
        started = not ray.is_initialized()
        if started:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=workers, num_gpus=num_gpus * workers if num_gpus else None, include_dashboard=False,
                     _temp_dir=tempfile.mkdtemp(prefix="labkit-ray-"), log_to_driver=False,
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}})
        try:
            actor = ray.remote(num_cpus=1, num_gpus=num_gpus, max_restarts=-1, max_task_retries=-1)(SweepWorker)
            pool = ActorPool([actor.remote(spec, self) for _ in range(workers)])  # the sweep travels inline
            for group in _seed_groups(cells):  # one task per batch of seeds: the same batches as locally
                pool.submit(lambda a, g: a.run.remote(g), group)
            while pool.has_next():
                yield from pool.get_next_unordered()
        finally:
            if started:
                ray.shutdown()


class SweepWorker:
    """A Ray actor's state: one Session (loaded once) and the sweep's interventions bound to it."""

    def __init__(self, spec: SessionSpec, sweep: Sweep) -> None:
        self.session = spec.load()
        self.sweep = sweep
        self.resolved: dict[str, list[Any]] = {}

    def run(self, cells: list[Cell]) -> list[dict[str, Any]]:
        """The rows of ``cells`` (one batch of seeds), on this worker's Session."""
        return self.sweep.run_cells(self.session, cells, self.resolved)


def _seed_groups(cells: Sequence[Cell]) -> list[list[Cell]]:
    """Consecutive cells that differ only in their seed (one batched generation each)."""
    return [list(g) for _, g in itertools.groupby(cells, key=lambda c: (c.prompt, c.sampler, c.intervention, c.kv))]


class _Sink:
    """Rows so far; new rows are appended to the Parquet dataset ``out`` in part files (one per flush), so what
    is written stays readable whatever happens to this process next."""

    def __init__(self, out: str | os.PathLike[str] | None, resume: bool, every_s: float = 2.0) -> None:
        self.path = Path(out) if out is not None else None
        self.rows: list[dict[str, Any]] = []
        self.done: set[str] = set()
        self._pending: list[dict[str, Any]] = []
        self._every_s, self._last = every_s, time.monotonic()
        if self.path is None:
            return
        if self.path.exists():
            if not resume:
                raise InvalidArgument(f"out {str(self.path)!r} exists; pass resume=True to continue it, or choose "
                                      f"another path")
            if not self.path.is_dir():
                raise InvalidArgument(f"out {str(self.path)!r} is not a Parquet dataset folder written by a sweep")
            for row in _read_rows(self.path):
                if row["cell"] not in self.done:
                    self.done.add(row["cell"])
                    self.rows.append(row)

    def add(self, row: dict[str, Any]) -> None:
        if row["cell"] in self.done:  # a retried cell whose first result also arrived
            return
        self.done.add(row["cell"])
        self.rows.append(row)
        self._pending.append(row)
        if time.monotonic() - self._last >= self._every_s:
            self.flush()

    def flush(self) -> None:
        if self.path is None or not self._pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        with atomic_path(self.path / name) as tmp:  # a reader never sees half a part
            pq.write_table(pa.Table.from_pylist(self._pending), tmp)
        self._pending, self._last = [], time.monotonic()

    def close(self) -> None:
        self.flush()


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for part in sorted(path.glob("part-*.parquet")):
        rows += pq.read_table(part).to_pylist()
    return rows


def read(out: str | os.PathLike[str]) -> Any:
    """The rows a sweep wrote to ``out`` as a DataFrame (each cell once)."""
    import pandas as pd

    path = Path(out)
    if not path.is_dir():
        raise InvalidArgument(f"out {str(path)!r} is not a sweep's Parquet dataset folder")
    rows = {r["cell"]: r for r in _read_rows(path)}
    return pd.DataFrame(list(rows.values()))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, done: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="cell", desc="sweep")


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A sweep configuration file (YAML) as a mapping."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"config {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise InvalidArgument(f"config {str(p)!r} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"config {str(p)!r} must be a YAML mapping (prompts:, samplers:, ...)")
    return data
