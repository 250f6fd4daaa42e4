"""Memory known before it is spent: the budget a feature may use, what each feature needs, one error when it does
not fit.

Every feature whose memory grows with the context, the layers or the steps asks :func:`check` (or sizes its pieces
with :func:`pieces`) before it allocates. The budget is the memory free on the device the work runs on — free RAM
(``MemAvailable``, capped by a cgroup limit) or free CUDA memory — unless the user sets one::

    with labkit.core.memory.budget("2GiB"):
        s.attention(long_prompt)          # refused with the bytes needed, or done in pieces

Estimates are in bytes, from the model's shape (:class:`Shape`) and the lengths involved; the formulas are on the
docs page "Memory". They count the tensors a feature keeps and its largest transient, not the weights (already
loaded) nor allocator slack.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from labkit.core.errors import InvalidArgument, MemoryBudgetExceeded

_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("labkit_memory_budget", default=None)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, name: str = "budget") -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"8GB"`` (decimal) or ``"2GiB"`` (binary)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", value, flags=re.IGNORECASE)
        if m and m.group(2).lower() in _UNITS and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise InvalidArgument(f"{name} must be a positive number of bytes or a size such as '512MiB' or '8GB'; "
                          f"got {value!r}")


def fmt_bytes(n: float) -> str:
    """``n`` bytes as a short binary size: ``'1.5 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


@contextlib.contextmanager
def budget(nbytes: int | str) -> Iterator[int]:
    """Inside the block every labkit feature plans for at most ``nbytes`` (an int or ``"2GiB"``) instead of the
    device's free memory; scoped (threads and asyncio tasks each see their own), restored on exit."""
    token = _BUDGET.set(parse_bytes(nbytes))
    try:
        yield _BUDGET.get()  # type: ignore[misc]
    finally:
        _BUDGET.reset(token)


CGROUP_V2 = Path("/sys/fs/cgroup")
"""Where the cgroup v2 hierarchy is mounted."""
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
"""Where cgroup v1's memory controller is mounted."""


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 ``memory.max``, or v1 ``memory.limit_in_bytes`` —
    ``labkit workshop`` puts each student in one), or None when there is none."""
    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in groups:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            candidates.append((CGROUP_V2 / path.lstrip("/"), "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):  # v1
            candidates.append((CGROUP_V1_MEMORY / path.lstrip("/"), "memory.limit_in_bytes",
                               "memory.usage_in_bytes"))
    for folder, limit_file, usage_file in candidates:
        try:
            limit = (folder / limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a huge number
                continue
            return max(0, int(limit) - int((folder / usage_file).read_text()))
        except (OSError, ValueError):
            continue
    return None


def _rlimit_free() -> int | None:
    """Bytes left under this process's data segment limit (``RLIMIT_DATA``, which ``labkit workshop`` sets per
    student), or None when there is none."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        used = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmData:"))
        return max(0, limit - used)
    except (ImportError, OSError, ValueError, StopIteration):
        return None


def free_ram() -> int:
    """Bytes of RAM available to this process now (``MemAvailable`` of /proc/meminfo, capped by a cgroup limit and
    by the data segment limit)."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if free is None:  # not Linux
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - no way to ask
            free = 8 * 2**30
    caps = [c for c in (_cgroup_free(), _rlimit_free()) if c is not None]
    return min([free, *caps])


def available(device: torch.device | str = "cpu") -> tuple[int, str]:
    """``(bytes, where)``: the budget for work on ``device`` — the user's :func:`budget` when one is set, else the
    free CUDA memory of that device, or free RAM — and a few words saying which."""
    override = _BUDGET.get()
    if override is not None:
        return override, "set with labkit.core.memory.budget"
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    return free_ram(), "free RAM"


def check(need: int, what: str, device: torch.device | str, reduce: str) -> None:
    """MemoryBudgetExceeded when ``need`` bytes exceed the budget on ``device``: the message names ``what``, the
    bytes needed, the budget and ``reduce`` (how to need less)."""
    have, where = available(device)
    if need > have:
        raise MemoryBudgetExceeded(f"{what} needs about {fmt_bytes(need)} but the budget is {fmt_bytes(have)} "
                                   f"({where}); {reduce}")


def pieces(total: int, per_item: int, fixed: int, what: str, device: torch.device | str, reduce: str,
           share: float = 0.5) -> int:
    """How many of ``total`` items to process at once so that ``fixed + n · per_item`` bytes stay within ``share``
    of the budget (at least 1); MemoryBudgetExceeded when even one item does not fit in the whole budget."""
    have, _ = available(device)
    check(fixed + per_item, what, device, reduce)
    return max(1, min(total, int((have * share - fixed) // max(1, per_item))))


# -- the model's shape and the features' needs -------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """What memory depends on in a decoder-only transformer."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    d_ff: int
    vocab_size: int
    dtype_bytes: int = 4
    """Bytes per activation element in the model's compute dtype (4 for float32, 2 for bfloat16/float16)."""

    @classmethod
    def of(cls, model: Any) -> Shape:
        """The shape of a loaded transformers model (its text config)."""
        cfg = model.config.get_text_config(decoder=True)
        heads = cfg.num_attention_heads
        d_ff = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None)
                or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size)
        return cls(n_layers=cfg.num_hidden_layers, n_heads=heads,
                   n_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, d_model=cfg.hidden_size,
                   d_ff=d_ff, vocab_size=cfg.vocab_size, dtype_bytes=torch.finfo(model.dtype).bits // 8
                   if model.dtype.is_floating_point else 4)

    @property
    def n_params(self) -> int:
        """Parameters of a Llama-style model of this shape (embedding and unembedding counted apart)."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        return self.n_layers * (attn + 3 * self.d_model * self.d_ff) + 2 * self.vocab_size * self.d_model


def attention_maps_bytes(shape: Shape, tokens: int, layers: int | None = None, heads: int | None = None,
                         itemsize: int = 4) -> int:
    """Full attention maps of ``tokens`` positions: ``layers · heads · T² · itemsize`` kept (all layers and heads
    when None), plus one layer's float32 scores and probabilities for the query block being computed."""
    n = (layers or shape.n_layers) * (heads or shape.n_heads)
    return n * tokens * tokens * itemsize + 2 * shape.n_heads * tokens * tokens * 4


def forward_bytes(shape: Shape, tokens: int, batch: int = 1) -> int:
    """The largest transient of one inference forward pass over ``batch × tokens`` positions (no cache kept): one
    layer's hidden states and MLP intermediates, and its attention scores where the kernel builds them."""
    per_token = 4 * shape.d_model + 2 * shape.d_ff + shape.head_dim * (shape.n_heads + 2 * shape.n_kv_heads)
    return batch * tokens * (per_token * shape.dtype_bytes + shape.n_heads * tokens * 4)


def backward_bytes(shape: Shape, tokens: int, kept_logits: int = 1) -> int:
    """Activations saved for the backward pass of one sequence of ``tokens`` positions (what gradient attribution
    stores per integration point): every layer's inputs of its norms, projections, attention and MLP, the
    attention probabilities, and the float32 logits of the ``kept_logits`` positions."""
    per_layer = (8 * shape.d_model + 5 * shape.d_ff + 2 * shape.head_dim * (shape.n_heads + 2 * shape.n_kv_heads)
                 ) * shape.dtype_bytes + 3 * shape.n_heads * tokens * 4
    return tokens * shape.n_layers * per_layer + 4 * kept_logits * shape.vocab_size * 4


def logits_bytes(shape: Shape, positions: int, copies: int = 4) -> int:
    """``positions`` rows of float32 logits over the vocabulary, ``copies`` times (logits, log-softmax, and the
    temporaries of their measures)."""
    return copies * positions * shape.vocab_size * 4


def kv_cache_bytes(shape: Shape, tokens: int, batch: int = 1) -> int:
    """A full KV cache of ``tokens`` positions: keys and values of every layer and KV head."""
    return 2 * batch * tokens * shape.n_layers * shape.n_kv_heads * shape.head_dim * shape.dtype_bytes


def longest_context(need: Any, shape: Shape, nbytes: int, limit: int = 1 << 22) -> int:
    """The largest context T (tokens) with ``need(shape, T) ≤ nbytes`` (bisection; ``need`` grows with T), 0 when
    not even one token fits."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(shape, mid) <= nbytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


#: Shapes for the docs' table of the longest context per budget: the default model and Llama-3-like 1B and 8B, in
#: bfloat16 (weights and activations; attention maps are stored as asked).
SHAPES = {
    "135M (SmolLM2-135M)": Shape(n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, d_model=576, d_ff=1536,
                                 vocab_size=49152, dtype_bytes=2),
    "1B (Llama-3.2-1B)": Shape(n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, d_model=2048, d_ff=8192,
                               vocab_size=128256, dtype_bytes=2),
    "8B (Llama-3.1-8B)": Shape(n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, d_model=4096, d_ff=14336,
                               vocab_size=128256, dtype_bytes=2),
}


def table(budgets: tuple[str, ...] = ("8GiB", "24GiB", "80GiB")) -> Any:
    """The longest context (tokens) each feature fits in each budget for the :data:`SHAPES`, after the weights
    (n_params × 2 bytes) are taken from the budget (0: the weights alone do not fit): a DataFrame, the docs'
    "Memory" table."""
    import pandas as pd

    features = {
        "attention maps, all layers (float32)": lambda s, t: attention_maps_bytes(s, t),
        "attention maps, all layers (float16)": lambda s, t: attention_maps_bytes(s, t, itemsize=2),
        "attention maps, one layer": lambda s, t: attention_maps_bytes(s, t, layers=1),
        "IG, one point per pass": lambda s, t: backward_bytes(s, t),
        "score (one chunk of 256 positions)": lambda s, t: forward_bytes(s, t) + logits_bytes(s, min(t, 256)),
        "KV cache (generation)": lambda s, t: kv_cache_bytes(s, t) + forward_bytes(s, 1),
    }
    rows = []
    for shape_name, shape in SHAPES.items():
        for feature, need in features.items():
            row = {"model": shape_name, "feature": feature}
            for b in budgets:
                left = parse_bytes(b) - shape.n_params * shape.dtype_bytes
                row[b] = longest_context(need, shape, left) if left > 0 else 0
            rows.append(row)
    return pd.DataFrame(rows)
