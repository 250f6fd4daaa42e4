"""Hook sites: the one place in labkit that knows where things are inside a model.

An :class:`Adapter` says, as attribute paths, where one architecture family keeps its token embedding, its list of
decoder blocks, each block's attention module, attention output projection and MLP, and the modules between the
last block and the unembedding. :func:`sites_of` finds the adapter of a loaded model once (from
``config.model_type``; a model type labkit does not list is matched by structure) and returns its :class:`Sites`:
the documented site names a user types, scoped context managers that read and edit them (every hook removed on
every exit path), the unembedding with the model's own logit post-processing, and per-head projections.

Site names (``L`` = block index, from 0; shapes for a batch of B sequences of T new positions):

=========================  ==================  ===========================================================
``embed``                  (B, T, d_model)     output of the token-embedding module (before positional
                                               embeddings or any scaling the model applies after it)
``blocks.L.resid_pre``     (B, T, d_model)     residual stream entering block L
``blocks.L.attn.z``        (B, T, H, d_head)   each head's attention output, before the output projection
``blocks.L.attn_out``      (B, T, d_model)     the attention module's output (after the output projection)
``blocks.L.mlp_in``        (B, T, d_model)     the MLP module's input (after the block's second norm; OPT's
                                               MLP module is its second projection: (B·T, d_ff) there)
``blocks.L.mlp_out``       (B, T, d_model)     the MLP's output
``blocks.L.resid_post``    (B, T, d_model)     residual stream leaving block L (= resid_pre of block L + 1)
``final_norm``             (B, T, d_model)     the last block's output after the final norm (what the
                                               unembedding reads)
``vision.blocks.L``        (N, P, d_vision)    a vision-language model's vision-tower block L (N images of P
                                               patches; Qwen2-VL: one row of all patches)
``projector``              (N, P', d_model)    a vision-language model's projector output (the image tokens;
                                               Qwen2.5-VL: in its tower's window order)
=========================  ==================  ===========================================================

Every site function has one signature, ``fn(value, positions) -> value | None``: ``value`` is the site's tensor in
the shape above, ``positions`` (T,) the absolute sequence positions of its T columns (a KV cache counted in);
return a tensor of the same shape to replace it, or None to leave it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from labkit.core.errors import InvalidArgument, UnsupportedArchitecture

SiteFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]
"""``fn(value, positions) -> value | None``: see the module docstring."""

BLOCK_SITES = ("resid_pre", "attn.z", "attn_out", "mlp_in", "mlp_out", "resid_post")
MODEL_SITES = ("embed", "final_norm")
_SITE_DOCS = {  # kind -> (shape, meaning)
    "embed": ("(B, T, d_model)", "token-embedding output"),
    "resid_pre": ("(B, T, d_model)", "residual stream entering the block"),
    "attn.z": ("(B, T, H, d_head)", "per-head attention output before the output projection"),
    "attn_out": ("(B, T, d_model)", "attention output after the output projection"),
    "mlp_in": ("(B, T, d_model)", "the MLP module's input (after its norm: what a transcoder reads)"),
    "mlp_out": ("(B, T, d_model)", "MLP output"),
    "resid_post": ("(B, T, d_model)", "residual stream leaving the block"),
    "final_norm": ("(B, T, d_model)", "last block's output after the final norm"),
    "vision.blocks.L": ("(images, patches, d_vision) or (1, patches, d_vision)",
                        "output of the vision tower's block L (VLMs; the family's own layout)"),
    "projector": ("(images, tokens, d_model) or (1, tokens, d_model)",
                  "the projector's output: the image tokens' vectors before they enter the language model (VLMs)"),
}
_VISION_RE = re.compile(r"^vision\.blocks\.(-?\d+)$")
_BLOCK_RE = re.compile(r"^blocks\.(-?\d+)\.(resid_pre|attn\.z|attn_out|mlp_in|mlp_out|resid_post)$")


@dataclass(frozen=True)
class Adapter:
    """Where one architecture family keeps its parts: attribute paths from the ``*ForCausalLM`` module (``blocks``,
    ``embed``, ``final``) or from one decoder block (``attn``, ``out_proj``, ``mlp``).

    ``final``: the modules applied, in order, to the last block's output before the unembedding (a path whose
    attribute exists but is None, like OPT's optional ``project_out``, is skipped). ``out_proj`` is the module
    whose input is the heads' outputs concatenated, head h at columns ``h·d_head:(h+1)·d_head`` (``Linear``,
    GPT-2's ``Conv1D``, a bitsandbytes layer: any module works, it is called, never read as a matrix). ``mlp`` is
    the module whose output is the MLP's output. ``attn_post`` / ``mlp_post`` (block paths, or None): a norm the
    block applies to the attention / MLP output before adding it to the residual stream (Gemma 2/3's and OLMo 2's
    "sandwich" norms); direct logit attribution passes each output through it. The final logit softcapping of
    Gemma 2/3 (``config.final_logit_softcapping``) is read from the config of any model.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final: tuple[str, ...]
    attn: str
    out_proj: str
    mlp: str
    attn_post: str | None = None
    mlp_post: str | None = None
    vision_blocks: str | None = None
    """A vision-language model's vision-tower blocks (a path from the top model), or None for a text model."""
    projector: str | None = None
    """A vision-language model's projector (multimodal connector) from vision features to the language model."""


LLAMA = Adapter("llama", ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "granite",
                          "smollm3", "cohere", "starcoder2"),
                blocks="model.layers", embed="model.embed_tokens", final=("model.norm",), attn="self_attn",
                out_proj="self_attn.o_proj", mlp="mlp")
# the Llama layout plus a norm on each sublayer's output (in these models "post_attention_layernorm" normalises the
# attention output; in Llama the same name is the norm before the MLP)
SANDWICH = dataclasses.replace(LLAMA, name="sandwich", model_types=("gemma2", "gemma3_text", "olmo2"),
                               attn_post="post_attention_layernorm", mlp_post="post_feedforward_layernorm")
GPT2 = Adapter("gpt2", ("gpt2",), blocks="transformer.h", embed="transformer.wte", final=("transformer.ln_f",),
               attn="attn", out_proj="attn.c_proj", mlp="mlp")
GPT_NEOX = Adapter("gpt_neox", ("gpt_neox",), blocks="gpt_neox.layers", embed="gpt_neox.embed_in",
                   final=("gpt_neox.final_layer_norm",), attn="attention", out_proj="attention.dense", mlp="mlp")
OPT = Adapter("opt", ("opt",), blocks="model.decoder.layers", embed="model.decoder.embed_tokens",
              final=("model.decoder.final_layer_norm", "model.decoder.project_out"), attn="self_attn",
              out_proj="self_attn.out_proj", mlp="fc2")

# vision-language models: the language model's blocks inside the multimodal model, beside the vision tower
_LANGUAGE = dict(blocks="model.language_model.layers", embed="model.language_model.embed_tokens",
                 final=("model.language_model.norm",))
LLAVA = dataclasses.replace(LLAMA, name="llava", model_types=("llava", "llava_next"), **_LANGUAGE,
                            vision_blocks="model.vision_tower.encoder.layers", projector="model.multi_modal_projector")
QWEN2_VL = dataclasses.replace(LLAMA, name="qwen2_vl", model_types=("qwen2_vl", "qwen2_5_vl"), **_LANGUAGE,
                               vision_blocks="model.visual.blocks", projector="model.visual.merger")
GEMMA3 = dataclasses.replace(SANDWICH, name="gemma3", model_types=("gemma3",), **_LANGUAGE,
                             vision_blocks="model.vision_tower.encoder.layers", projector="model.multi_modal_projector")
PALIGEMMA = dataclasses.replace(LLAMA, name="paligemma", model_types=("paligemma",), **_LANGUAGE,
                                vision_blocks="model.vision_tower.encoder.layers",
                                projector="model.multi_modal_projector")

IDEFICS3 = dataclasses.replace(LLAMA, name="idefics3", model_types=("idefics3",), blocks="model.text_model.layers",
                               embed="model.text_model.embed_tokens", final=("model.text_model.norm",),
                               vision_blocks="model.vision_model.encoder.layers", projector="model.connector")

ADAPTERS: dict[str, Adapter] = {}
"""Registered adapters by name (see :func:`register_adapter`)."""


def register_adapter(adapter: Adapter, overwrite: bool = False) -> Adapter:
    """Declare where a new architecture keeps its parts, e.g. for a model whose ``config.model_type`` is "mygpt"::

        labkit.model.hooks.register_adapter(labkit.model.hooks.Adapter(
            "mygpt", ("mygpt",), blocks="backbone.blocks", embed="backbone.wte", final=("backbone.norm",),
            attn="attn", out_proj="attn.proj", mlp="ffn"))

    Sessions loaded afterwards use it; a model type already declared needs ``overwrite=True``."""
    if not isinstance(adapter, Adapter):
        raise InvalidArgument(f"adapter must be a labkit.model.hooks.Adapter; got {type(adapter).__name__}")
    taken = {t: a.name for a in ADAPTERS.values() if a.name != adapter.name for t in a.model_types}
    clash = [t for t in adapter.model_types if t in taken]
    if not overwrite and (adapter.name in ADAPTERS or clash):
        raise InvalidArgument(f"an adapter named {adapter.name!r} or for model types {clash} is already registered; "
                              "pass overwrite=True to replace it")
    for other in list(ADAPTERS.values()):  # with overwrite: the new adapter takes those model types over
        if other.name != adapter.name and clash:
            kept = tuple(t for t in other.model_types if t not in clash)
            ADAPTERS[other.name] = dataclasses.replace(other, model_types=kept)
    ADAPTERS[adapter.name] = adapter
    return adapter


for _a in (LLAMA, SANDWICH, GPT2, GPT_NEOX, OPT, LLAVA, QWEN2_VL, GEMMA3, IDEFICS3, PALIGEMMA):
    register_adapter(_a)


# -- module lookup -------------------------------------------------------------------------------------------

def module_named(model: Any, name: str) -> torch.nn.Module:
    """``model.get_submodule(name)`` with an error that lists the closest names that exist."""
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else f"; e.g. {list(modules)[1:6]}"
        raise InvalidArgument(f"the model has no module {name!r}{hint}")
    return modules[name]


_MISSING = object()


def _attr(root: Any, path: str) -> Any:
    """The object at dotted ``path`` under ``root`` (None if an attribute is None), or _MISSING."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING or obj is None:
            return obj
    return obj


def _problems(model: Any, adapter: Adapter) -> list[str]:
    """What ``adapter`` does not find in ``model`` (empty when it fits)."""
    blocks = _attr(model, adapter.blocks)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        return [f"no list of decoder blocks at {adapter.blocks}"]
    problems = [f"no {what} at {path}" for what, path in (("embedding", adapter.embed),)
                if not isinstance(_attr(model, path), torch.nn.Module)]
    problems += [f"no final module attribute {path}" for path in adapter.final if _attr(model, path) is _MISSING]
    block = blocks[0]
    problems += [f"no {what} at {adapter.blocks}.0.{path}" for what, path in
                 (("attention", adapter.attn), ("attention output projection", adapter.out_proj),
                  ("MLP", adapter.mlp), ("attention output norm", adapter.attn_post),
                  ("MLP output norm", adapter.mlp_post))
                 if path is not None and not isinstance(_attr(block, path), torch.nn.Module)]
    problems += [f"no {what} at {path}" for what, path in (("vision blocks", adapter.vision_blocks),
                                                           ("projector", adapter.projector))
                 if path is not None and not isinstance(_attr(model, path), torch.nn.Module)]
    return problems


def find_adapter(model: Any) -> Adapter:
    """The adapter of ``model``: the one declared for its ``config.model_type``, else the first whose paths all
    exist in it; UnsupportedArchitecture (listing what each adapter misses) when none fits. A vision-language
    model whose language model has sandwich norms (PaliGemma 2's Gemma 2) gets its adapter with them."""
    model_type = getattr(model.config, "model_type", "?")
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            text_type = getattr(model.config.get_text_config(decoder=True), "model_type", None)
            if adapter.vision_blocks is not None and adapter.attn_post is None and text_type in SANDWICH.model_types:
                adapter = dataclasses.replace(adapter, attn_post=SANDWICH.attn_post, mlp_post=SANDWICH.mlp_post)
            problems = _problems(model, adapter)
            if problems:
                raise UnsupportedArchitecture(
                    f"{type(model).__name__} (model_type {model_type!r}) does not have the layout of labkit's "
                    f"{adapter.name!r} adapter: {'; '.join(problems)}. Declare its layout with "
                    "labkit.model.hooks.register_adapter(labkit.model.hooks.Adapter(...), overwrite=True)")
            return adapter
    misses = {}
    for adapter in ADAPTERS.values():
        problems = _problems(model, adapter)
        if not problems:
            return adapter
        misses[adapter.name] = problems[0]
    tried = "; ".join(f"{name}: {miss}" for name, miss in misses.items())
    raise UnsupportedArchitecture(
        f"labkit has no hook-site adapter for {type(model).__name__} (model_type {model_type!r}) and none of the "
        f"known layouts fits it ({tried}). Declare where its parts are in a few lines with "
        "labkit.model.hooks.register_adapter(labkit.model.hooks.Adapter(name, (model_type,), blocks=..., embed=..., "
        "final=(...), attn=..., out_proj=..., mlp=...)); see the docs page 'Any model: hook sites and supported "
        "architectures'")


# -- sites of one model ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SiteInfo:
    """One site name, its shape and what it holds."""

    name: str
    shape: str
    description: str


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class Sites:
    """The hook sites of one loaded model (get it with :func:`sites_of` or ``Session.sites``)."""

    def __init__(self, model: Any, adapter: Adapter) -> None:
        self.adapter = adapter
        self._model_ref = weakref.ref(model)
        cfg = model.config.get_text_config(decoder=True)
        self.blocks: torch.nn.ModuleList = _attr(model, adapter.blocks)
        self.n_layers = len(self.blocks)
        self.n_heads: int = cfg.num_attention_heads
        self.d_model: int = cfg.hidden_size
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.logit_softcap: float | None = getattr(cfg, "final_logit_softcapping", None)
        self.embed: torch.nn.Module = _attr(model, adapter.embed)
        self.final: list[torch.nn.Module] = [m for m in (_attr(model, p) for p in adapter.final) if m is not None]
        self.unembedding: torch.nn.Module = model.get_output_embeddings()
        self.vision_blocks: torch.nn.ModuleList | None = (_attr(model, adapter.vision_blocks)
                                                          if adapter.vision_blocks else None)
        self.projector: torch.nn.Module | None = _attr(model, adapter.projector) if adapter.projector else None

    @property
    def model(self) -> Any:
        """The model these sites address (held by a weak reference; the Session keeps it alive)."""
        model = self._model_ref()
        if model is None:  # pragma: no cover - the Session keeps its model alive
            raise RuntimeError("the model of these Sites was freed")
        return model

    def __repr__(self) -> str:
        return (f"Sites(adapter={self.adapter.name!r}, layers={self.n_layers}, heads={self.n_heads}, "
                f"d_head={self.head_dim}, d_model={self.d_model})")

    # -- parts ----------------------------------------------------------------------------------------------
    def block(self, layer: int) -> torch.nn.Module:
        """Decoder block ``layer`` (checked: an error names how many there are)."""
        return self.blocks[self.check_layer(layer)]

    def part(self, layer: int, which: str) -> torch.nn.Module:
        """``which`` in "attn", "out_proj", "mlp", "attn_post", "mlp_post": that module of block ``layer`` (None for
        a post norm the architecture does not have)."""
        path = getattr(self.adapter, which)
        return None if path is None else _attr(self.block(layer), path)

    def check_layer(self, layer: Any, name: str = "layer") -> int:
        """``layer`` as an index in [0, n_layers) (negative counts from the end); InvalidArgument otherwise."""
        n = self.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise InvalidArgument(f"{name} must be an integer in [0, {n}) (or negative from the end); this model has "
                                  f"{n} layers; got {layer!r}")
        return layer % n

    def check_head(self, head: Any) -> int:
        """``head`` if it is a head index of this model, else InvalidArgument naming the range."""
        n = self.n_heads
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n:
            raise InvalidArgument(f"head must be an integer in [0, {n}): each layer has {n} heads; got {head!r}")
        return head

    # -- names ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every site name of this model, in forward order."""
        inner = [f"blocks.{layer}.{site}" for layer in range(self.n_layers) for site in BLOCK_SITES]
        vision = [f"vision.blocks.{i}" for i in range(len(self.vision_blocks or ()))]
        return [*vision, *(["projector"] if self.projector is not None else []), "embed", *inner, "final_norm"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        try:
            self.resolve(name)  # type: ignore[arg-type]
        except InvalidArgument:
            return False
        return True

    def table(self) -> Any:
        """A DataFrame of the site names with their shape and meaning (the kinds, with ``L`` for the block)."""
        import pandas as pd

        rows = [SiteInfo(name, *_SITE_DOCS[name.removeprefix("blocks.L.")])
                for name in ("embed", *(f"blocks.L.{s}" for s in BLOCK_SITES), "final_norm")]
        if self.vision_blocks is not None:
            rows[:0] = [SiteInfo(name, *_SITE_DOCS[name]) for name in ("vision.blocks.L", "projector")]
        frame = pd.DataFrame([r.__dict__ for r in rows])
        frame.attrs["layers"] = self.n_layers
        return frame

    def resolve(self, name: str) -> tuple[str, int | None]:
        """``(kind, layer)`` of a site name; InvalidArgument (with the close names) for one that does not exist."""
        if not isinstance(name, str):
            raise InvalidArgument(f"site must be a site name such as 'blocks.0.resid_post'; got {name!r}")
        if name in MODEL_SITES:
            return name, None
        if name == "projector" and self.projector is not None:
            return name, None
        v = _VISION_RE.match(name)
        if v and self.vision_blocks is not None:
            n = len(self.vision_blocks)
            i = int(v.group(1))
            if not -n <= i < n:
                raise InvalidArgument(f"{name!r}: the vision tower has {n} blocks; the index must be in [0, {n})")
            return "vision", i % n
        m = _BLOCK_RE.match(name)
        if m:
            return m.group(2), self.check_layer(int(m.group(1)), name="the site's block index")
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)
        hint = f"; did you mean {close}?" if close else ""
        vision = ", 'vision.blocks.L', 'projector'" if self.vision_blocks is not None else ""
        raise InvalidArgument(f"unknown site {name!r}{hint}; sites are 'embed', 'final_norm'{vision} and "
                              f"'blocks.L.{{{','.join(BLOCK_SITES)}}}' with L in [0, {self.n_layers})")

    # -- hooks ----------------------------------------------------------------------------------------------
    def hook(self, name: str, fn: SiteFn) -> list[Any]:
        """Register ``fn(value, positions) -> value | None`` at site ``name``; returns the handles to remove
        (prefer the scoped :meth:`edit` and :meth:`read`)."""
        kind, layer = self.resolve(name)
        positions = _Positions()
        handles = [self.model.register_forward_pre_hook(positions.hook, with_kwargs=True)]
        try:
            handles += self._register(kind, layer, fn, positions)
        except BaseException:
            handles[0].remove()
            raise
        return handles

    def _register(self, kind: str, layer: int | None, user_fn: SiteFn, positions: _Positions) -> list[Any]:
        name = kind if layer is None else f"vision.blocks.{layer}" if kind == "vision" else f"blocks.{layer}.{kind}"

        def fn(value: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
            new = user_fn(value, pos)
            if new is not None and (not isinstance(new, torch.Tensor) or new.shape != value.shape):
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise InvalidArgument(f"the function at site {name!r} must return None or a tensor of shape "
                                      f"{tuple(value.shape)}; got {got}")
            return new

        if kind in ("vision", "projector"):
            return self._register_image_side(kind, layer, fn)
        if kind == "resid_pre":
            def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                hidden = args[0] if args else kwargs["hidden_states"]
                new = fn(hidden, positions.of(hidden))
                if new is None:
                    return None
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

            return [self.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True)]
        if kind == "attn.z":
            heads, d = self.n_heads, self.head_dim

            def pre_z(module: Any, args: tuple[Any, ...]) -> Any:
                x = args[0]  # (B, T, H·D)
                new = fn(x.unflatten(-1, (heads, d)), positions.of(x))  # (B, T, H, D)
                return None if new is None else (new.flatten(-2), *args[1:])

            return [self.part(layer, "out_proj").register_forward_pre_hook(pre_z)]
        if kind == "mlp_in":
            return [self.part(layer, "mlp").register_forward_pre_hook(_mlp_in_hook(fn, positions), with_kwargs=True)]
        module = {"embed": self.embed, "final_norm": self.final[-1] if self.final else None,
                  "attn_out": self.part(layer, "attn") if layer is not None else None,
                  "mlp_out": self.part(layer, "mlp") if layer is not None else None,
                  "resid_post": self.blocks[layer] if layer is not None else None}[kind]
        if module is None:
            raise UnsupportedArchitecture(f"site {kind!r}: this model has no final norm module")

        handles = []
        batch_seq: list[torch.Size] = []  # the block's (B, T): OPT's MLP runs on the flattened (B·T, d_model)
        if kind == "mlp_out":
            def remember(block: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                batch_seq[:] = [hidden.shape[:2]]

            handles.append(self.blocks[layer].register_forward_pre_hook(remember, with_kwargs=True))

        def post(module: Any, args: Any, output: Any) -> Any:
            hidden = _hidden(output)
            flat = hidden.ndim == 2 and bool(batch_seq)
            value = hidden.view(*batch_seq[0], hidden.shape[-1]) if flat else hidden  # (B, T, d_model)
            new = fn(value, positions.of(value))
            if new is None:
                return None
            return _replace(output, new.reshape(hidden.shape) if flat else new)

        handles.append(module.register_forward_hook(post))
        return handles

    def _register_image_side(self, kind: str, layer: int | None, fn: SiteFn) -> list[Any]:
        """A vision-language model's image-side site: positions are the patches (or tokens) of its own pass."""
        module = self.vision_blocks[layer] if kind == "vision" else self.projector

        def image_side(module: Any, args: Any, output: Any) -> Any:
            value = _hidden(output)
            flat = value.ndim == 2  # Qwen2-VL's tower runs on (patches, d): shown as one batch row
            shown = value[None] if flat else value
            new = fn(shown, torch.arange(shown.shape[1]))
            return None if new is None else _replace(output, new[0] if flat else new)

        return [module.register_forward_hook(image_side)]

    @contextlib.contextmanager
    def edit(self, edits: dict[str, SiteFn]) -> Iterator[None]:
        """Inside the block, every forward pass runs ``edits`` ({site name: fn}); hooks removed on any exit."""
        with contextlib.ExitStack() as scope:
            for name, fn in edits.items():
                for handle in self.hook(name, fn):
                    scope.callback(handle.remove)
            yield

    @contextlib.contextmanager
    def read(self, names: Sequence[str], last: bool = False) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Record the sites ``names`` at every forward pass inside the block: {name: [tensor per pass]}, detached
        (``last=True``: only the last position of each pass, shape (B, ...)). Hooks removed on any exit."""
        seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

        def keeper(name: str) -> SiteFn:
            def keep(value: torch.Tensor, positions: torch.Tensor) -> None:
                seen[name].append((value[:, -1] if last else value).detach())

            return keep

        with self.edit({name: keeper(name) for name in names}):
            yield seen

    # -- computations -----------------------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """Shape (..., d_model) -> (..., V): the model's own path from a residual stream to logits (final norm
        unless ``normed``, unembedding, final logit softcapping where the model has it)."""
        x = hidden
        if not normed:
            for module in self.final:
                x = module(x)
        logits = self.unembedding(x)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def head_outputs(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Shape (..., H, d_head) -> (..., H, d_model): what each head writes into the residual stream, through
        block ``layer``'s own output projection (called on each head's slice alone, its bias removed), so any
        projection type (Linear, Conv1D, quantized) is exact."""
        proj = self.part(layer, "out_proj")
        heads = z.shape[-2]
        eye = torch.eye(heads, dtype=z.dtype, device=z.device)  # (H, H): row h keeps head h only
        only = z.unsqueeze(-3) * eye[:, :, None]  # (..., H, H, D)
        out = proj(only.flatten(-2))  # (..., H, d_model)
        bias = proj(torch.zeros_like(only[..., :1, :, :]).flatten(-2))  # (..., 1, d_model): the projection's bias
        return out - bias

    @contextlib.contextmanager
    def first_blocks(self, n: int) -> Iterator[None]:
        """Inside the block the model runs only its first ``n`` decoder blocks (then its final modules and the
        unembedding): the same weights and modules, hooks included, a shorter block list."""
        parent_path, _, attr = self.adapter.blocks.rpartition(".")
        parent = _attr(self.model, parent_path) if parent_path else self.model
        full = self.blocks
        setattr(parent, attr, torch.nn.ModuleList(list(full)[:n]))
        try:
            yield
        finally:
            setattr(parent, attr, full)


def _mlp_in_hook(fn: SiteFn, positions: _Positions) -> Callable[..., Any]:
    """The pre-hook of site ``blocks.L.mlp_in``: the MLP module's input."""
    def pre_mlp(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        flat = hidden.ndim == 2  # OPT runs its MLP on (B·T, d): shown as one row (labkit runs B = 1 here)
        value = hidden[None] if flat else hidden
        new = fn(value, positions.of(value))
        if new is None:
            return None
        new = new[0] if flat else new
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    return pre_mlp


class _Positions:
    """Absolute positions of the columns of the current forward pass: set by a pre-hook on the top model from the
    KV cache it is given (labkit runs unpadded sequences)."""

    def __init__(self) -> None:
        self.offset = 0

    def hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.offset = int(cache.get_seq_length()) if cache is not None else 0

    def of(self, value: torch.Tensor) -> torch.Tensor:
        return torch.arange(self.offset, self.offset + value.shape[1])  # (T,)


_SITES: weakref.WeakKeyDictionary[Any, Sites] = weakref.WeakKeyDictionary()


def sites_of(model: Any) -> Sites:
    """The :class:`Sites` of a loaded transformers causal LM (found once per model, then reused)."""
    sites = _SITES.get(model)
    if sites is None:
        sites = _SITES[model] = Sites(model, find_adapter(model))
    return sites


def eager_attention_of(module: torch.nn.Module) -> Callable[..., Any]:
    """The eager attention function of ``module``'s own modeling file (what transformers runs for
    ``attn_implementation="eager"``, softcapping included)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedArchitecture(f"{type(module).__name__} has no eager_attention_forward in its modeling file: "
                                      "attention capture cannot reproduce its eager attention")
    return fn
