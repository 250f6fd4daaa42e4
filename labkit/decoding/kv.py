"""KV-cache policies: what a generation's cache keeps, and at what precision, with the memory it holds measured.

A policy is a small frozen object with a spec string (``parse_kv("quant:bits=4,residual=128")``); ``new_cache(n)``
builds a transformers ``Cache`` of n layers of its own cache-layer class (transformers' cache-layer API,
``DynamicLayer``). Policies:

- ``full`` — every key and value at the model's precision (transformers' ``DynamicLayer``; labkit's default).
- ``quant:bits=4|8,residual=R,int8=M,group=G`` — the seed's tiered scheme: the last R positions at full precision,
  the M positions before them at 8 bits, older ones at ``bits``. Each position's key (value) vector of each KV head is
  split into groups of G channels; a group is stored as unsigned codes c = round((x − min) / scale) with
  scale = (max − min) / (2^b − 1), and min and scale in float32 (per token, per head, per channel group;
  asymmetric; round-to-nearest, so ``|x − dequantized| ≤ scale / 2``). 4-bit codes are packed two to a byte. A position
  is quantized once when it leaves the full-precision window (and re-quantized from its 8-bit form when it leaves
  the 8-bit window). Written by hand: transformers' ``QuantizedLayer`` needs the quanto or HQQ backends, quantizes
  the prompt at once whatever ``residual_length`` is, and re-quantizes dequantized values at every flush.
- ``window:sinks=S,window=W`` — StreamingLLM: the first S positions (attention sinks) and the last W; the others are
  evicted. Kept keys keep the rotary positions they were computed at (no re-rotation).
- ``h2o:budget=B,recent=R`` — heavy hitters (H2O): the last R positions and the B older ones with the largest
  accumulated attention (the attention labkit captures, switched on for the run).

With an evicting policy, captured attention rows cover every position; an evicted key scores −inf (weight 0) and is
marked by ``AttentionRow.outside_window``.

Memory is the bytes of the tensors a cache holds (``cache_bytes``), all layers. Units: bytes; KL in bits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from labkit.core.errors import InvalidArgument, check_int
from labkit.core.specs import parse_spec

# -- quantization ------------------------------------------------------------------------------------------------


@dataclass
class Quantized:
    """Codes of a tensor (..., T, D) quantized per (..., position, channel group): ``codes`` uint8 (packed two per
    byte at 4 bits), ``mins`` and ``scales`` float32 (..., T, D // group)."""

    codes: torch.Tensor
    mins: torch.Tensor
    scales: torch.Tensor
    bits: int
    group: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the codes, minima and scales together."""
        return self.codes.nbytes + self.mins.nbytes + self.scales.nbytes

    @property
    def length(self) -> int:
        """Number of positions held (T)."""
        return self.mins.shape[-2]


def quantize(x: torch.Tensor, bits: int, group: int) -> Quantized:
    """Shape (..., T, D) with D divisible by ``group`` -> Quantized (round-to-nearest, asymmetric min–max)."""
    *lead, d = x.shape
    g = x.float().reshape(*lead, d // group, group)  # (..., T, D/g, g)
    lo, hi = g.amin(-1), g.amax(-1)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)  # a constant group: any scale is exact
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, levels).to(torch.uint8).reshape(*lead, d)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (..., T, D/2): two codes per byte
    return Quantized(codes, lo, scale, bits, group, x.dtype)


def dequantize(q: Quantized) -> torch.Tensor:
    """The float32 values of a quantized block, shape (..., T, D): ``min + code · scale`` per group."""
    codes = q.codes
    if q.bits == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).flatten(-2)  # (..., T, D)
    *lead, d = codes.shape
    g = codes.reshape(*lead, d // q.group, q.group).float()
    return (g * q.scales[..., None] + q.mins[..., None]).reshape(*lead, d).to(q.dtype)


def _cat_quantized(parts: list[Quantized]) -> Quantized | None:
    parts = [p for p in parts if p is not None and p.length > 0]
    if not parts:
        return None
    first = parts[0]
    return Quantized(torch.cat([p.codes for p in parts], -2), torch.cat([p.mins for p in parts], -2),
                     torch.cat([p.scales for p in parts], -2), first.bits, first.group, first.dtype)


def _split_quantized(q: Quantized, n: int) -> tuple[Quantized, Quantized]:
    """The first ``n`` positions and the rest."""
    def part(sl: slice) -> Quantized:
        return Quantized(q.codes[..., sl, :], q.mins[..., sl, :], q.scales[..., sl, :], q.bits, q.group, q.dtype)

    return part(slice(0, n)), part(slice(n, None))


# -- cache layers ------------------------------------------------------------------------------------------------

def _refuse_crop() -> None:
    raise InvalidArgument("a compressed KV cache cannot be cropped (speculative decoding, which crops, is refused with "
                          "every policy but kv='full' before the first token)")


def _layer_base() -> type:
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


def _tiered_layer_class() -> type:
    """The cache-layer class of the ``quant`` policy (built on first use: transformers loads lazily)."""
    base = _layer_base()

    class TieredQuantizedLayer(base):  # type: ignore[misc, valid-type]
        """Oldest positions at ``bits``, then ``int8`` positions at 8 bits, the last ``residual`` at full precision
        (``keys``/``values`` of the DynamicLayer). Holds every position: only precision is lost."""

        def __init__(self, bits: int, residual: int, int8: int, group: int) -> None:
            super().__init__()
            self.bits, self.residual, self.int8, self.group = bits, residual, int8, group
            self.old: list[Quantized | None] = [None, None]  # keys, values at ``bits``
            self.mid: list[Quantized | None] = [None, None]  # keys, values at 8 bits
            self.length = 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.length += key_states.shape[-2]
            parts_k = [dequantize(q) for q in (self.old[0], self.mid[0]) if q is not None]
            parts_v = [dequantize(q) for q in (self.old[1], self.mid[1]) if q is not None]
            full_k = torch.cat([*parts_k, self.keys, key_states], dim=-2)  # what this pass attends to
            full_v = torch.cat([*parts_v, self.values, value_states], dim=-2)
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self._settle()
            return full_k, full_v

        def _settle(self) -> None:
            """Move positions that left the full-precision window to 8 bits (or ``bits``), and those that left the
            8-bit window down to ``bits``."""
            extra = self.keys.shape[-2] - self.residual
            if extra > 0:
                leaving = [self.keys[..., :extra, :], self.values[..., :extra, :]]
                self.keys, self.values = self.keys[..., extra:, :], self.values[..., extra:, :]
                mid_bits = 8 if self.int8 > 0 else self.bits
                target = self.mid if self.int8 > 0 else self.old
                for i in (0, 1):
                    target[i] = _cat_quantized([target[i], quantize(leaving[i], mid_bits, self.group)])
            if self.int8 > 0 and self.mid[0] is not None and self.mid[0].length > self.int8:
                n = self.mid[0].length - self.int8
                for i in (0, 1):
                    down, self.mid[i] = _split_quantized(self.mid[i], n)
                    self.old[i] = _cat_quantized([self.old[i], quantize(dequantize(down), self.bits, self.group)])

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        @property
        def nbytes(self) -> int:
            held = [q.nbytes for q in (*self.old, *self.mid) if q is not None]
            return sum(held) + self.keys.nbytes + self.values.nbytes

        def crop(self, tokens_to_remove: int) -> None:
            _refuse_crop()

    return TieredQuantizedLayer


def _window_layer_class() -> type:
    """The cache-layer class of the ``window`` policy (built on first use)."""
    base = _layer_base()

    class SinkWindowLayer(base):  # type: ignore[misc, valid-type]
        """Keeps the first ``sinks`` positions and the last ``window`` (StreamingLLM); ``positions`` are the
        absolute positions of the kept keys."""

        def __init__(self, sinks: int, window: int) -> None:
            super().__init__()
            self.sinks, self.window = sinks, window
            self.length = 0
            self.positions = torch.zeros(0, dtype=torch.long)
            self.seen = self.positions

        def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            """Add a pass's new positions; ``seen`` becomes the positions of the keys this pass attends to."""
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.positions = torch.cat([self.positions, torch.arange(self.length, self.length + n)])
            self.seen = self.positions
            self.length += n

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self._append(key_states, value_states)
            full_k, full_v = self.keys, self.values
            held = self.keys.shape[-2]
            if held > self.sinks + self.window:
                keep = torch.cat([torch.arange(self.sinks), torch.arange(held - self.window, held)])
                self.keys, self.values = self.keys[..., keep, :], self.values[..., keep, :]
                self.positions = self.positions[keep]
            return full_k, full_v

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            held = self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0
            return held + query_length, self.length - held

        @property
        def nbytes(self) -> int:
            return self.keys.nbytes + self.values.nbytes

        def crop(self, tokens_to_remove: int) -> None:
            _refuse_crop()

    return SinkWindowLayer


def _heavy_hitter_layer_class() -> type:
    """The cache-layer class of the ``h2o`` policy (built on first use)."""
    base = _window_layer_class()

    class HeavyHitterLayer(base):  # type: ignore[misc, valid-type]
        """H2O: after each pass, keeps the last ``recent`` positions and, of the older ones, the ``budget`` with the
        largest accumulated attention (summed over heads and over the query rows labkit captures: the newest
        position of every pass). Ties go to the earlier position."""

        def __init__(self, budget: int, recent: int) -> None:
            super().__init__(sinks=0, window=recent)
            self.budget, self.recent = budget, recent
            self.score = torch.zeros(0)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self._append(key_states, value_states)
            self.score = torch.cat([self.score, torch.zeros(key_states.shape[-2])])
            return self.keys, self.values  # evicted in observe(), once this pass's attention is known

        def observe(self, probs: torch.Tensor) -> None:
            """``probs`` (H, len(seen)): the newest query's attention over the keys of the latest pass; add it to
            each key's score, then evict down to ``budget + recent`` keys."""
            self.score = self.score + probs.float().sum(0).cpu()
            held = len(self.positions)
            if held <= self.budget + self.recent:
                return
            older = held - self.recent
            order = sorted(range(older), key=lambda i: (-float(self.score[i]), i))[:self.budget]
            keep = torch.cat([torch.tensor(sorted(order), dtype=torch.long), torch.arange(older, held)])
            self.keys, self.values = self.keys[..., keep, :], self.values[..., keep, :]
            self.positions, self.score = self.positions[keep], self.score[keep]

    return HeavyHitterLayer


# -- policies ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Full:
    """Every key and value at the model's precision (the default)."""

    evicts = False

    @property
    def spec(self) -> str:
        """The policy's spec string (``full``)."""
        return "full"

    def new_cache(self, n_layers: int) -> Any:
        """transformers' DynamicCache: every position at full precision."""
        from labkit.model.cache import new_cache

        return new_cache()


class _Layered:
    """A policy whose cache is n layers of one labkit layer class, built from the policy's fields in order; its spec
    is ``name:field=value,...``."""

    name: ClassVar[str]
    layer_class: ClassVar[Callable[[], type]]

    @property
    def spec(self) -> str:
        return f"{self.name}:" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    def new_cache(self, n_layers: int) -> Any:
        from transformers.cache_utils import Cache

        layer = type(self).layer_class()
        args = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return Cache(layers=[layer(*args) for _ in range(n_layers)])


@dataclass(frozen=True)
class Quant(_Layered):
    """Tiered quantization: the last ``residual`` positions at full precision, the ``int8`` before them at 8 bits,
    older ones at ``bits`` (4 or 8), in groups of ``group`` channels (see the module docstring)."""

    bits: int = 4
    residual: int = 128
    int8: int = 0
    group: int = 32
    evicts = False
    name = "quant"
    layer_class = staticmethod(_tiered_layer_class)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise InvalidArgument(f"quant bits must be 4 or 8; got {self.bits!r}")
        check_int("quant residual", self.residual, 0)
        check_int("quant int8", self.int8, 0)
        check_int("quant group", self.group, 2)
        if self.group % 2:
            raise InvalidArgument(f"quant group must be even (4-bit codes are packed in pairs); got {self.group}")



@dataclass(frozen=True)
class Window(_Layered):
    """StreamingLLM: keep the first ``sinks`` positions and the last ``window``."""

    sinks: int = 4
    window: int = 256
    evicts = True
    name = "window"
    layer_class = staticmethod(_window_layer_class)

    def __post_init__(self) -> None:
        check_int("window sinks", self.sinks, 0)
        check_int("window window", self.window, 1)



@dataclass(frozen=True)
class HeavyHitters(_Layered):
    """H2O: keep the last ``recent`` positions and the ``budget`` older ones with the most accumulated attention
    (needs the attention labkit captures: switched on for the run)."""

    budget: int = 128
    recent: int = 32
    evicts = True
    name = "h2o"
    layer_class = staticmethod(_heavy_hitter_layer_class)

    def __post_init__(self) -> None:
        check_int("h2o budget", self.budget, 0)
        check_int("h2o recent", self.recent, 1)



POLICIES = {"full": Full, "quant": Quant, "window": Window, "h2o": HeavyHitters}
"""KV-cache policies by spec name; open: :func:`register` adds one (then ``kv="name:..."`` works in ``generate``, the
command line's ``--kv``, sweeps and the Lab)."""


def register(cls: type) -> type:
    """Add a policy class (a frozen dataclass deriving ``_Layered``, with ``name``, ``evicts`` and ``layer_class``)
    under its ``name``; returns ``cls`` (a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, _Layered) and dataclasses.is_dataclass(cls)):
        raise InvalidArgument(f"register takes a frozen dataclass deriving labkit.decoding.kv._Layered; got {cls!r}")
    POLICIES[cls.name] = cls
    return cls


def needs_attention(policy: Any) -> bool:
    """Whether the policy scores keys by attention (H2O): the loop then captures attention rows."""
    return isinstance(policy, HeavyHitters)


def place(row: Any, cache: Any, length: int) -> Any:
    """An AttentionRow of an evicting cache (per layer, over the keys of the latest pass) -> one over every position
    0..length-1: evicted positions score −inf (weight 0; ``AttentionRow.outside_window`` marks them). Heavy-hitter
    layers take the row's probabilities into their scores (and evict) here."""
    from labkit.measures.attention import AttentionRow

    scores = row.scores  # (L, H, W)
    out = torch.full((*scores.shape[:2], length), float("-inf"))
    for layer_index, layer in enumerate(cache.layers):
        seen = layer.seen
        kept = scores[layer_index, :, scores.shape[-1] - len(seen):]  # (H, len(seen)): the recorder left-pads
        out[layer_index][:, seen] = kept
        if hasattr(layer, "observe"):
            layer.observe(torch.softmax(kept, dim=-1))
    return AttentionRow(out)


def parse_kv(spec: Any) -> Any:
    """A policy from its spec string (``"full"``, ``"quant:bits=4,residual=128"``, ``"window:sinks=4,window=256"``),
    or a policy object itself; None is ``Full()``."""
    if spec is None:
        return Full()
    if isinstance(spec, tuple(POLICIES.values())):  # any registered policy, not only the built-in four
        return spec
    if not isinstance(spec, str):
        raise InvalidArgument(f"kv must be a cache policy or a spec string such as 'quant:bits=4'; got {spec!r}")
    name, params = parse_spec(spec, "kv")
    if name not in POLICIES:
        raise InvalidArgument(f"kv policy {name!r} is not one of {sorted(POLICIES)} (e.g. 'quant:bits=4,residual=128', "
                              "'window:sinks=4,window=256')")
    fields = {f.name for f in dataclasses.fields(POLICIES[name])}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise InvalidArgument(f"kv policy {name!r} has no parameter {unknown[0]!r}; it takes {sorted(fields)}")
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"kv {name} {key} must be an integer; got {value!r}")
    return POLICIES[name](**params)


def cache_bytes(cache: Any) -> int:
    """Bytes of the key/value tensors ``cache`` holds, all layers (codes, scales and full-precision parts)."""
    total = 0
    for layer in cache.layers:
        if hasattr(type(layer), "nbytes"):
            total += layer.nbytes
        elif getattr(layer, "is_initialized", False) and layer.keys is not None:
            total += layer.keys.nbytes + layer.values.nbytes
    return total


def check_kv(policy: Any, speculative: Any, capture: Any, config: Any = None) -> None:
    """Refuse, before the first token, what a policy cannot do exactly on this model (``config``)."""
    if isinstance(policy, Full):
        return
    if speculative is not None:
        raise InvalidArgument(f"kv={policy.spec!r} cannot be combined with speculative decoding: rolling back a "
                              "rejected draft needs a cache that can be cropped (use kv='full')")
    cfg = config.get_text_config(decoder=True) if config is not None else None
    if isinstance(policy, Quant) and cfg is not None:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if head_dim % policy.group:
            raise InvalidArgument(f"kv quant group={policy.group} must divide the model's head size {head_dim}")
    if policy.evicts and cfg is not None and getattr(cfg, "sliding_window", None):
        raise InvalidArgument(f"kv={policy.spec!r} evicts keys, and this model has sliding-window layers: "
                              "transformers builds their mask from absolute positions, which an evicting cache no "
                              "longer has (use kv='full' or a quant policy)")


def bits_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Shape (n, V) each -> (n,): KL(P ‖ Q) in bits of the softmaxes of two logit rows."""
    lp, lq = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0) / math.log(2.0)


def full_cache_bytes(config: Any, positions: int, dtype: torch.dtype) -> int:
    """Bytes a full cache of ``positions`` positions takes for a model ``config`` (keys and values, all layers)."""
    cfg = config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * positions * torch.empty(0, dtype=dtype).element_size()


@dataclass
class KVReport:
    """What :func:`evaluate` measured: ``rows`` (one per policy and prompt) and ``summary()`` (one per policy)."""

    rows: list[dict[str, Any]]

    def to_pandas(self) -> Any:
        """:meth:`summary`'s rows before aggregation: one per policy × prompt (memory, KL bits/step, top-1, ms)."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def summary(self) -> Any:
        """Per policy: cache MiB at the end and its ratio to the full cache, mean and max KL(policy ‖ full)
        (bits/step), top-1 agreement, perplexity of the output under the full model, ms/token (means over the
        prompts; the max of the maxima)."""
        frame = self.to_pandas()
        agg = {"cache_mib": "mean", "ratio_to_full": "mean", "mean_kl_bits": "mean", "max_kl_bits": "max",
               "top1_agreement": "mean", "perplexity": "mean", "ms_per_token": "mean"}
        return frame.groupby("policy", sort=False).agg(agg).reset_index()

    def plot(self) -> Any:
        """Memory (ratio to the full cache) against mean KL (bits/step), one labelled point per policy (a Chart)."""
        import plotly.graph_objects as go

        from labkit.records.figures import Chart

        table = self.summary()
        fig = Chart(data=[go.Scatter(x=table["ratio_to_full"], y=table["mean_kl_bits"], mode="markers+text",
                                     text=table["policy"], textposition="top center", textfont={"size": 10},
                                     name="policies")])  # each point named on the figure, not only on hover
        fig.update_layout(title="KV cache: memory against information lost", xaxis_title="cache memory / full cache",
                          yaxis_title="mean KL(policy ‖ full), bits per step", height=380)
        return fig


def divergence(session: Any, trace: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step of ``trace`` (generated with ``capture=["logits"]`` under some policy, no interventions): KL(policy ‖
    full) in bits, shape (n,), and whether the top-1 tokens agree, shape (n,) bool — against the full cache's
    distributions on the same tokens (one teacher-forced pass)."""
    if not trace.steps or "logits" not in trace.steps[0].captures:
        raise InvalidArgument("divergence needs a trace generated with capture=['logits']")
    return _against(trace, session.teacher_forced_logits(trace))


def _against(trace: Any, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(policy ‖ full) bits (n,) and top-1 agreement (n,) of ``trace``'s captured logits against ``full`` (n, V)."""
    ran = torch.stack([st.captures["logits"] for st in trace.steps]).float().cpu()  # (n, V)
    return bits_kl(ran, full), full.argmax(-1) == ran.argmax(-1)


def evaluate(session: Any, prompts: Sequence[str], policies: Sequence[Any], max_new_tokens: int = 64) -> KVReport:
    """Greedy generation of each prompt under each policy (no interventions), each step's next-token distribution
    compared with the full model's on the same tokens (one teacher-forced pass): KL(policy ‖ full) in bits, top-1
    agreement, the output's perplexity under the full model, the cache's bytes at the end and ms per decoded token
    (the steps after the first, which also reads the prompt)."""
    if isinstance(prompts, str) or not prompts:
        raise InvalidArgument("prompts must be a non-empty list of strings")
    if isinstance(policies, str) or not policies:
        raise InvalidArgument("policies must be a non-empty list of cache policies or specs")
    parsed = [parse_kv(p) for p in policies]
    rows = []
    for policy in parsed:
        for prompt in prompts:
            trace = session.generate(prompt, max_new_tokens=max_new_tokens, kv=policy, capture=["logits"])
            full = session.teacher_forced_logits(trace)  # (n, V), one pass for the KL and the perplexity
            kl, agree = _against(trace, full)  # KL(policy ‖ full): the sweeps' kl_to_baseline_bits direction
            actual = torch.tensor(trace.token_ids)
            nll = -torch.log_softmax(full, -1).gather(-1, actual[:, None])[:, 0]
            held = len(trace.prompt_ids) + len(trace) - 1  # the newest token is not in the cache yet
            reference = full_cache_bytes(session.model.config, held, session.model.dtype)
            used = trace.steps[-1].kv["bytes"]
            decoding = trace.steps[1:] or trace.steps  # ms/token of decoding: the first step also reads the prompt
            rows.append({"policy": policy.spec, "prompt": prompt, "tokens": len(trace), "cache_mib": used / 2**20,
                         "ratio_to_full": used / reference, "mean_kl_bits": float(kl.mean()),
                         "max_kl_bits": float(kl.max()),
                         "top1_agreement": float(agree.float().mean()),
                         "perplexity": float(nll.mean().exp()),
                         "ms_per_token": sum(st.time_ms for st in decoding) / len(decoding)})
    return KVReport(rows)
