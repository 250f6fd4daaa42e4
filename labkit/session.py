"""Session: one loaded model and the verbs a notebook user types (next_token, generate, stream, stop)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from labkit import __version__
from labkit.core.errors import InvalidArgument, SessionBusy, check_int, deprecated, invalid_choice
from labkit.core.tokens import TokenTexts, token_id
from labkit.decoding import loop
from labkit.decoding.settings import GenerationSettings, Run, StopRules
from labkit.features.reading import top_features
from labkit.interventions.base import activated, check_interventions
from labkit.measures import information as info
from labkit.model import models
from labkit.records.results import Distribution, Score
from labkit.records.trace import Step, Trace, TraceMeta
from labkit.sampling.base import Sampler


class Session:
    """A real causal language model, loaded once, with instrumented next-token and generation verbs.

    ``model`` is ``"default"`` (the bundled SmolLM2-135M-Instruct), a local Hugging Face folder, a ``.gguf`` file
    (dequantised to ``dtype``), a hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` found in the local
    Hugging Face cache (``revision`` a branch, tag or commit; nothing is ever downloaded), or a transformers causal
    LM already loaded (with ``tokenizer=``; see :meth:`from_model`).
    ``device`` "auto"|"cpu"|"cuda"; ``dtype`` "auto"|"float32"|"bfloat16"|"float16";
    ``quantization`` None|"8bit"|"4bit" (bitsandbytes); ``attn`` "auto"|"sdpa"|"eager"|"xformers";
    ``device_map`` ("auto", "balanced", or a dict {module name: "cuda:0" | "cpu" | "disk"}), ``max_memory`` and
    ``offload_folder`` spread a model larger than one device over GPUs, CPU and disk (accelerate).
    A vision-language model (LLaVA, Qwen2-VL, Gemma 3; a folder, a cache id or an object with ``image_processor=``)
    loads the same way: ``next_token``, ``generate``, ``stream``, ``score``, ``activations``, ``attention`` and
    ``lens`` then take ``images=`` (see :mod:`labkit.model.vlm`), and ``Session.vision`` describes its image side.
    ``Session.model`` and ``Session.tokenizer`` are the transformers objects. A Session may be used from a
    background thread and the notebook at once: one generation runs at a time, a second gets SessionBusy.
    """

    def __init__(self, model: Any = "default", device: str = "auto", dtype: str = "auto",
                 quantization: str | None = None, attn: str = "auto", progress: bool = True, *,
                 tokenizer: Any = None, revision: str | None = None, device_map: Any = None, max_memory: Any = None,
                 offload_folder: str | os.PathLike[str] | None = None, image_processor: Any = None) -> None:
        from labkit.model import vlm

        self.model, self.tokenizer, self.info = models.load(
            model, device=device, dtype=dtype, quantization=quantization, attn=attn, progress=progress,
            tokenizer=tokenizer, revision=revision, device_map=device_map, max_memory=max_memory,
            offload_folder=offload_folder)
        self.device = torch.device(self.info.device)
        self.vision = vlm.vision_of(self.model, self.tokenizer, image_processor,
                                    self.info.path if self.info.source != "object" else None)
        """The image side of a vision-language model (:class:`labkit.model.vlm.Vision`), None for a text model."""
        self._lock = threading.Lock()  # not re-entrant: a generation started from inside another is refused
        self._stop = threading.Event()
        self.token_text = TokenTexts(self.tokenizer)
        """``token_text(id)``: the text of one token id (cached), as Steps and Traces show it."""
        self._scoped: list[Any] = []  # token-level interventions of open `intervene` scopes, outermost first
        self._image_prompt: Any = None  # the ImagePrompt of the pass running now (see _with_images)
        self.last_trace: Trace | None = None
        """The Trace of the latest generation, however it ended (also when a callback raised)."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, image_processor: Any = None) -> Session:
        """A Session over a transformers causal LM already loaded in this process (one you quantised, edited,
        placed with ``device_map``, or a PEFT model), used as it is: same weights, device(s) and dtype. A
        vision-language model takes its ``image_processor`` too."""
        return cls(model, tokenizer=tokenizer, image_processor=image_processor)

    def __repr__(self) -> str:
        i = self.info
        return (f"Session(model={i.name!r}, device={i.device!r}, dtype={i.dtype!r}, attn={i.attn!r}, "
                f"quantization={i.quantization!r}, layers={i.n_layers}, heads={i.n_heads})")

    @property
    def model_id(self) -> str:
        """Name recorded in traces: the default model's name, or the folder, file, hub id or model name given."""
        return models.DEFAULT_MODEL_NAME if self.info.name == models.DEFAULT_MODEL else self.info.name

    @property
    def sites(self) -> Any:
        """The model's hook sites (:class:`labkit.model.hooks.Sites`): ``list(s.sites)`` gives every site name
        (``"blocks.3.resid_post"``...), ``s.sites.table()`` their shapes and meaning, ``s.sites.read([...])`` and
        ``s.sites.edit({...})`` scoped reads and edits. UnsupportedArchitecture when labkit has no adapter for
        the model (declare one with :func:`labkit.model.hooks.register_adapter`)."""
        from labkit.model.hooks import sites_of

        return sites_of(self.model)

    # -- input -------------------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False, reserve: int = 0) -> torch.Tensor:
        """Token ids of ``prompt`` (chat template applied when ``chat``), shape (1, T), on the model's device.

        ``reserve`` tokens must still fit in the context after the prompt.
        """
        if not isinstance(prompt, str):
            raise InvalidArgument(f"prompt must be a str; got {type(prompt).__name__}")
        if prompt == "":
            raise InvalidArgument("prompt must not be empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidArgument(f"prompt must be valid Unicode text; it holds {prompt[e.start]!r} (a lone surrogate) "
                                  f"at index {e.start}") from None
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = self.tokenizer(prompt).input_ids
        limit = self.info.context_length
        if len(ids) + reserve > limit:
            extra = f" + {reserve} new tokens" if reserve else ""
            raise InvalidArgument(f"prompt is {len(ids)} tokens{extra}; the model's context is {limit} tokens")
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    @property
    def image_prompt(self) -> Any:
        """The :class:`~labkit.model.vlm.ImagePrompt` whose passes run now (inside a verb given ``images=``), else
        None: image interventions read its layout."""
        return self._image_prompt

    def _inputs(self, prompt: str, chat: bool, reserve: int, images: Any) -> tuple[torch.Tensor, Any]:
        """``(ids (1, T) on the model's device, ImagePrompt or None)``: :meth:`encode`'s ids, or with ``images`` the
        prompt with each image expanded into its tokens (InvalidArgument for a text model)."""
        if images is None:
            return self.encode(prompt, chat=chat, reserve=reserve), None
        if self.vision is None:
            raise InvalidArgument(f"images= needs a vision-language model; {self.model_id!r} is a text model")
        self.encode(prompt, chat=False)  # the same checks of the text
        made = self.vision.prompt(prompt, images, chat=chat)
        length, limit = made.ids.shape[1], self.info.context_length
        if length + reserve > limit:
            raise InvalidArgument(f"prompt with its images is {length} tokens (+ {reserve} new); the model's context "
                                  f"is {limit} tokens")
        return made.ids.to(self.device), made

    @contextlib.contextmanager
    def _with_images(self, made: Any) -> Iterator[None]:
        """The scope in which the model's passes over the prompt get ``made``'s pixels (nothing for None);
        ``_image_prompt`` names it meanwhile (image interventions read its layout)."""
        from labkit.model import vlm

        if made is None:
            yield
            return
        with vlm.attached(self.model, self.vision, made):
            self._image_prompt = made
            try:
                yield
            finally:
                self._image_prompt = None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the Session for a block of model calls made outside labkit's verbs (a panel's or a sweep's own
        forward pass): SessionBusy when a generation runs; released however the block ends."""
        if not self._lock.acquire(blocking=False):
            raise SessionBusy("this Session is busy with a generation (in another thread, or the one this call was "
                              "made from, e.g. inside on_step or a stream's loop); wait for it to end, or call "
                              "session.stop()")
        try:
            yield
        finally:
            self._lock.release()

    # -- verbs -------------------------------------------------------------------------------------------
    def next_token(self, prompt: str, chat: bool = False, images: Any = None) -> Distribution:
        """The next-token distribution after ``prompt`` (no sampler). Outside any :meth:`intervene` scope it is the
        model's raw distribution; inside one, the scope's interventions apply — activation-level ones in the forward
        pass, token-level ones to the logits as at a generation's first step — and ``Distribution.interventions``
        names the token-level ones that changed it."""
        from labkit.interventions.base import InterventionContext, apply_all

        ids, made = self._inputs(prompt, chat, 0, images)
        with self.exclusive(), self._with_images(made), torch.inference_mode():
            logits = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1:].float()  # (1, V)
            logits, changed = apply_all(logits, InterventionContext(0, [], ids[0].tolist(), self), self._scoped)
            logprobs = torch.log_softmax(logits[0], dim=-1).cpu()  # (V,) nats
        return Distribution(logprobs=logprobs, tokenizer=self.tokenizer, prompt=prompt, interventions=changed)

    def score(self, text: str, chat: bool = False, images: Any = None) -> Score:
        """Per-token surprisal, entropy and rank of ``text``'s own tokens, and its perplexity (one forward pass; the
        logits over the vocabulary are made a chunk of positions at a time, sized by the memory budget). With
        ``images`` the image tokens are among the tokens scored (their placeholder ids: read the text tokens)."""
        ids, made = self._inputs(text, chat, 0, images)
        if ids.shape[1] < 2:
            raise InvalidArgument(f"text must be at least 2 tokens to score; {text!r} is {ids.shape[1]}")
        chosen, ranks, entropies = [], [], []
        with self.exclusive(), self._with_images(made), torch.inference_mode():
            for start, logits in self._logits_in_chunks(ids, 0, ids.shape[1] - 1):  # (R, V) predicting start+1..
                logp = torch.log_softmax(logits, dim=-1)  # (R, V) nats
                actual = ids[0, start + 1:start + 1 + logits.shape[0]].to(logp.device)  # (R,)
                picked = logp.gather(-1, actual[:, None])  # (R, 1)
                chosen.append(picked[:, 0].cpu())
                ranks.append(((logp > picked).sum(-1) + 1).cpu())  # (R,)
                entropies.append(info.entropy_and_varentropy(logp, "bits")[0].cpu())  # (R,)
        token_ids = ids[0].tolist()
        return Score(text=text, token_ids=token_ids, tokens=[self.token_text(i) for i in token_ids],
                     logprobs=torch.cat(chosen).tolist(), entropy_bits=torch.cat(entropies).tolist(),
                     rank=torch.cat(ranks).tolist())

    def _logits_in_chunks(self, ids: torch.Tensor, first: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, logits)`` over positions ``first``..``stop``−1 of ``ids`` (1, T): float32 (R, V) a chunk of R
        positions at a time, R sized by the memory budget. One forward pass keeps the final norm's output (T,
        d_model); each chunk goes through the model's own unembedding (and final softcapping). Checked against the
        model's own logits at the last position; a model without hook sites is run whole, after a memory check."""
        from labkit.core import memory
        from labkit.core.errors import UnsupportedArchitecture

        shape = memory.Shape.of(self.model)
        n, length = stop - first, ids.shape[1]
        per_row = memory.logits_bytes(shape, 1, copies=5)  # logits, log-softmax and the measures' temporaries
        fixed = memory.forward_bytes(shape, length)
        what, fix = f"logits over {n} positions of a {length}-token text", "use a shorter text"
        try:
            sites = self.sites
        except UnsupportedArchitecture:
            memory.check(fixed + n * per_row, what, self.device, fix)
            yield first, self.model(input_ids=ids).logits[0, first:stop].float()
            return
        rows = memory.pieces(n, per_row, fixed, what, self.device, fix)
        with sites.read(["final_norm"]) as seen:
            own = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()  # (V,)
        hidden = seen["final_norm"][0][0]  # (T, d_model)
        check = sites.logits(hidden[-1:], normed=True)[0].float()
        if not torch.allclose(check, own, rtol=1e-4, atol=1e-4 * float(own.abs().max())):
            raise UnsupportedArchitecture(f"{type(self.model).__name__}: the unembedding of the final norm's output "
                                          "differs from the model's own logits; chunked logits would be wrong")
        for start in range(first, stop, rows):
            yield start, sites.logits(hidden[start:min(stop, start + rows)], normed=True).float()

    def token_probabilities(self, prompts: Sequence[str], token: str | int, chat: bool = False) -> Any:
        """Probability of one ``token`` (text of one token, or an id) after each prompt: a DataFrame with
        prompt, token, prob, logprob (nats), rank and entropy (bits) of each next-token distribution."""
        import pandas as pd

        if isinstance(prompts, str) or not prompts:
            raise InvalidArgument("prompts must be a non-empty list of strings")
        tid = token_id(self.tokenizer, token)
        rows = []
        for prompt in prompts:
            d = self.next_token(prompt, chat=chat)
            lp = d.logprobs[tid]
            rows.append({"prompt": prompt, "token": self.token_text(tid), "prob": float(lp.exp()), "logprob": float(lp),
                         "rank": int((d.logprobs > lp).sum()) + 1, "entropy_bits": d.entropy("bits")})
        return pd.DataFrame(rows)

    compare_token_probabilities = token_probabilities  # the name seed 000 uses

    def compare(self, prompts: Sequence[str], token: str | int, chat: bool = False) -> Any:
        """Deprecated name of :meth:`token_probabilities` ("compare" is for samplers: ``labkit compare``,
        :func:`labkit.sampling.compare.evaluate`)."""
        deprecated("Session.compare(prompts, token) is now Session.token_probabilities (compare is for samplers)")
        return self.token_probabilities(prompts, token, chat=chat)

    def attention(self, prompt: str, chat: bool = False, layers: Sequence[int] | None = None,
                  heads: Sequence[int] | None = None, dtype: str = "float32", images: Any = None) -> Any:
        """Full attention matrices of ``prompt``: AttentionMaps with probs of shape (L, H, T, T) for ``layers`` and
        ``heads`` (default: all), stored in ``dtype`` ("float32" | "float16" | "bfloat16") on the CPU. They equal
        eager attention's ``output_attentions``, computed a block of query rows at a time beside the model's own
        attention. Their memory, L·H·T²·(bytes per value), is checked against the budget first
        (:mod:`labkit.core.memory`): MemoryBudgetExceeded names the bytes and how to need less."""
        from labkit.core import memory
        from labkit.measures.attention import MAP_DTYPES, AttentionMaps, attention_maps
        from labkit.model.vlm import display_tokens

        if dtype not in MAP_DTYPES:
            raise invalid_choice("dtype", dtype, tuple(MAP_DTYPES))
        layer_list = self._indices("layers", layers, self.info.n_layers)
        head_list = self._indices("heads", heads, self.info.n_heads)
        ids, made = self._inputs(prompt, chat, 0, images)
        length, torch_dtype = ids.shape[1], MAP_DTYPES[dtype]
        kept = len(layer_list) * len(head_list) * length * length * torch_dtype.itemsize
        memory.check(kept, f"attention maps of {len(layer_list)} layers × {len(head_list)} heads over {length} "
                     f"tokens ({dtype})", "cpu", "choose fewer layers= or heads=, dtype='float16', or a shorter prompt")
        with self.exclusive(), self._with_images(made):
            maps = attention_maps(self.model, ids, layer_list, head_list, torch_dtype)
        probs = torch.stack([maps[layer] for layer in layer_list])  # (L_sel, H_sel, T, T)
        return AttentionMaps(probs=probs, tokens=display_tokens(self.token_text, ids, made), layers=layer_list,
                             heads=head_list,
                             image_block=None if made is None else made.layout.positions.tolist())

    @staticmethod
    def _indices(name: str, values: Sequence[int] | None, n: int) -> list[int]:
        """``values`` checked as distinct indices in [0, n) (negative from the end), or all of them for None."""
        if values is None:
            return list(range(n))
        if isinstance(values, int) and not isinstance(values, bool):
            values = [values]
        if isinstance(values, str) or not isinstance(values, Sequence) or not values:
            raise InvalidArgument(f"{name} must be a non-empty list of integers in [0, {n}) or None for all; got "
                                  f"{values!r}")
        out = [check_int(name, v, -n, n - 1) % n for v in values]
        if len(set(out)) != len(out):
            raise InvalidArgument(f"{name} must not repeat an index; got {list(values)!r}")
        return out

    def lens(self, prompt: str, chat: bool = False, k: int = 5, images: Any = None) -> Any:
        """Logit lens after ``prompt``: each layer's next-token distribution (LogitLens, shape (L, V))."""
        from labkit.measures.lens import logit_lens

        check_int("k", k, 1, self.info.vocab_size)
        ids, made = self._inputs(prompt, chat, 0, images)
        with self.exclusive(), self._with_images(made):
            return logit_lens(self.model, ids, self.token_text, k=k)

    def teacher_forced_logits(self, trace: Trace) -> torch.Tensor:
        """Shape (n, V): the model's raw logits at each of ``trace``'s n steps, recomputed in one full-cache forward
        pass over the prompt and the generated tokens (what a full cache would have given on the same tokens). The
        result (n·V float32 values) is checked against the memory budget first; it is made in chunks."""
        from labkit.core import memory

        if not isinstance(trace, Trace) or not trace.steps:
            raise InvalidArgument("trace must be a labkit Trace with at least one step")
        n = len(trace)
        memory.check(n * self.info.vocab_size * 4, f"teacher-forced logits of {n} steps", "cpu",
                     "use a trace with fewer steps (trace.steps[:k] in a new Trace)")
        ids = torch.tensor([[*trace.prompt_ids, *trace.token_ids[:-1]]], device=self.device)
        length = ids.shape[1]
        out = torch.empty(n, self.info.vocab_size)  # (n, V) on the CPU
        with self.exclusive(), torch.inference_mode():
            for start, logits in self._logits_in_chunks(ids, length - n, length):
                out[start - (length - n):start - (length - n) + logits.shape[0]] = logits.cpu()
        return out

    # -- why: activations and attribution ------------------------------------------------------------------
    def activations(self, prompt: str, sites: Sequence[str], chat: bool = False, images: Any = None) -> Any:
        """The activations at hook ``sites`` (names from ``list(s.sites)``) of one forward pass over ``prompt``:
        an :class:`labkit.why.activations.Activations` — ``acts["blocks.3.resid_post"]`` has shape (T, d_model),
        ``blocks.L.attn.z`` (T, H, d_head); ``save``/``load`` (safetensors), ``to_pandas()`` (norms)."""
        from labkit.why.activations import Activations, check_site_names, run_with_cache

        names = check_site_names(self.sites, sites)
        ids, made = self._inputs(prompt, chat, 0, images)
        with self.exclusive(), self._with_images(made):
            tensors = run_with_cache(self.sites, ids, names)
        return Activations(tensors=tensors, tokens=[self.token_text(i) for i in ids[0].tolist()],
                           token_ids=ids[0].tolist(), prompt=prompt, model=self.model_id,
                           meta={"dtype": self.info.dtype, "chat": str(chat)})

    def features(self, prompt: str, sae: Any, chat: bool = False, images: Any = None) -> Any:
        """The features of ``sae`` (a :class:`labkit.features.sae.SAE`, or a folder in SAELens' format) at every
        position of ``prompt``: :class:`labkit.features.reading.Features` (activations (T, d_sae), top features per
        position, reconstruction error, an image over tokens × features). The activations' memory is checked
        first."""
        from labkit.core import memory
        from labkit.features import reading
        from labkit.features.sae import as_sae
        from labkit.model.vlm import display_tokens

        sae = as_sae(sae, self)
        ids, made = self._inputs(prompt, chat, 0, images)
        memory.check(ids.shape[1] * sae.d_sae * 4 * 3, f"{sae.d_sae} features at {ids.shape[1]} positions", "cpu",
                     "use a shorter prompt")
        with self.exclusive(), self._with_images(made):
            return reading.features(self.sites, ids, sae, display_tokens(self.token_text, ids, made))

    def attribute(self, prompt: str, target: str | int | None = None, foil: str | int | None = None,
                  method: str = "ig", position: int | None = None, quantity: str = "prob", steps: int = 64,
                  batch: int | None = None, baseline: str = "unk", chat: bool = False, max_steps: int = 512,
                  tolerance: float = 0.01) -> Any:
        """Why the model predicts ``target`` after ``prompt``: an :class:`labkit.why.attribution.Attribution` with one
        score per prompt token. ``method`` "saliency" | "input_x_gradient" | "ig" | "rollout"; ``quantity`` the
        target's "prob" (default, as inseq) | "logprob" (nats) | "logit"; ``foil`` makes it a contrast
        f(target) − f(foil). ``target`` None: the prompt's own next token at ``position`` (default: the last
        position, whose target is the model's top prediction). ``steps``/``batch``/``baseline`` ("unk", inseq's
        default | "zero" | "mean"): IG's points, points per forward pass (default: what the memory budget holds) and
        starting point. IG's rule is adaptive (:func:`labkit.why.attribution.adaptive_ig`): intervals of 8 points are
        halved where their own completeness residual is largest until the residuals add up to ``tolerance`` (1 %)
        or ``max_steps`` points are used — on a CPU a 259-token text of the default model needed 368 points, about
        6 minutes on 2 cores; read ``completeness_error``."""
        from labkit.why.attribution import attribute

        ids = self.encode(prompt, chat=chat)
        return self._attribute(ids, target, foil, method, position, quantity, steps, batch, baseline, attribute,
                               max_steps, tolerance)

    def attribute_step(self, trace: Trace, index: int, method: str = "ig", foil: str | int | None = None,
                       target: str | int | None = None, quantity: str = "prob", steps: int = 64,
                       batch: int | None = None, baseline: str = "unk", max_steps: int = 512,
                       tolerance: float = 0.01) -> Any:
        """:meth:`attribute` for step ``index`` of a generation: the context is the prompt (as fed, chat template
        included) and the tokens generated before it, the target the step's token (or ``target``). Attributes
        the model's own prediction: token-level interventions and the sampler act after it."""
        from labkit.why.attribution import attribute

        ids, token = self.step_context(trace, index)
        return self._attribute(ids, token if target is None else target, foil, method, None, quantity, steps, batch,
                               baseline, attribute, max_steps, tolerance)

    def _attribute(self, ids: torch.Tensor, target: Any, foil: Any, method: str, position: int | None,
                   quantity: str, steps: int, batch: int | None, baseline: str, attribute: Callable[..., Any],
                   max_steps: int = 512, tolerance: float = 0.01) -> Any:
        from labkit.why.attribution import check_baseline, check_method, check_quantity

        check_method(method)
        check_quantity(quantity)
        check_baseline(baseline)
        length = ids.shape[1]
        if position is not None:
            check_int("position", position, -length, length - 1)
        where = (length - 1) if position is None else position % length
        foil_id = None if foil is None else token_id(self.tokenizer, foil)
        with self.exclusive():
            if target is None and where < length - 1:
                target_id = int(ids[0, where + 1])
            elif target is None:
                with torch.inference_mode():
                    target_id = int(self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].argmax())
            else:
                target_id = token_id(self.tokenizer, target)
            return attribute(self.sites, ids, target_id, foil=foil_id, method=method, position=where,
                             quantity=quantity, steps=steps, batch=batch, baseline=baseline, token_text=self.token_text,
                             tokenizer=self.tokenizer, max_steps=max_steps, tolerance=tolerance)

    def logit_attribution(self, prompt: str, token: str | int | None = None, foil: str | int | None = None,
                          chat: bool = False, *, against: str | int | None = None) -> Any:
        """Direct logit attribution at the last position of ``prompt``: the logit of ``token`` (default: the top
        prediction), or the difference to ``foil`` (as :meth:`attribute`), split into the embedding, each layer's
        attention (and each head) and MLP, with the final norm's scale frozen
        (:class:`labkit.why.logit_attribution.LogitAttribution`). ``against=`` is the deprecated name of ``foil``."""
        ids = self.encode(prompt, chat=chat)
        return self._logit_attribution(ids, token, _foil(foil, against))

    def logit_attribution_step(self, trace: Trace, index: int, foil: str | int | None = None, *,
                               against: str | int | None = None) -> Any:
        """:meth:`logit_attribution` of step ``index``'s token, with the prompt and earlier tokens as context."""
        ids, token = self.step_context(trace, index)
        return self._logit_attribution(ids, token, _foil(foil, against))

    def _logit_attribution(self, ids: torch.Tensor, token: Any, foil: Any) -> Any:
        from labkit.why.logit_attribution import decompose

        foil_id = None if foil is None else token_id(self.tokenizer, foil)
        with self.exclusive():
            if token is None:
                with torch.inference_mode():
                    token = int(self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].argmax())
            return decompose(self.sites, ids, token_id(self.tokenizer, token), foil_id, token_text=self.token_text)

    def step_context(self, trace: Trace, index: int) -> tuple[torch.Tensor, int]:
        """The ids (1, T + index) a generation's step ``index`` saw, and its token id."""
        if not isinstance(trace, Trace):
            raise InvalidArgument(f"trace must be a labkit Trace; got {type(trace).__name__}")
        if trace.meta.model != self.model_id:
            raise InvalidArgument(f"the trace was generated by {trace.meta.model!r}; this Session holds "
                                  f"{self.model_id!r}")
        check_int("index", index, -len(trace), len(trace) - 1)
        if trace.images:
            raise InvalidArgument("this trace's prompt holds images: recomputing a step needs them, which labkit does "
                                  "not do yet (attribute the image prompt with s.grounding or the interventions)")
        index %= len(trace)
        ids = [*trace.prompt_ids, *trace.token_ids[:index]]
        return torch.tensor([ids], dtype=torch.long, device=self.device), trace.steps[index].token_id

    def stream(self, prompt: str, max_new_tokens: int = 64, sampler: Sampler | None = None, seed: int | None = None,
               stop: str | int | Sequence[str | int] | None = None, chat: bool = False,
               capture: Sequence[str] = (), top_k: int = 10, interventions: Sequence[Any] = (),
               speculative: Any = None, metrics: Sequence[str] = (), kv: Any = None,
               n: int | None = None, beam: Any = None, *, settings: GenerationSettings | None = None,
               images: Any = None) -> Generation:
        """Start a generation; iterate the result for Steps as they are made (``.trace`` holds them all; with ``n``,
        ``.traces`` holds the n sequences and their Steps arrive row by row within each token).

        Arguments are those of :meth:`generate`. The Session is held until the iteration ends or is closed.
        """
        capture, saes = _feature_captures(capture)
        return self._start(prompt, _settings(settings, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                                             stop=stop, chat=chat, capture=capture, top_k=top_k,
                                             interventions=interventions, speculative=speculative, metrics=metrics,
                                             kv=kv, n=n, beam=beam), images, saes)

    def _start(self, prompt: str, settings: GenerationSettings, images: Any = None,
               saes: Sequence[Any] = ()) -> Generation:
        """A Generation of ``prompt`` with ``settings``, after the checks that need this model and Session: the
        settings against the model, the interventions and the sampler (and draft) bound, the prompt and its room,
        the captures' memory."""
        settings.for_model(self.info, lambda: self.sites, self.model.config)
        from labkit.features.sae import as_sae

        saes = [as_sae(sae, self) for sae in saes]
        seeds = settings.seeds if settings.seed is not None else settings.draw_seeds()  # unseeded: fresh each run
        interventions = self._bound(settings.interventions)  # errors (bad layer, token text) surface here
        with self.exclusive():
            settings.sampler.bind(self)  # a sampler reading layers or loading an amateur model; its errors surface
            if settings.speculative is not None:
                settings.speculative.bind(self)  # loads a draft model once; errors (tokenizer, layers) surface here
        _check_forced_steps(interventions, settings.max_new_tokens)
        rules = settings.stop_rules(self.tokenizer, self.info.vocab_size, self.eos_ids)
        ids, made = self._inputs(prompt, settings.chat, settings.max_new_tokens, images)
        self._check_capture_memory(settings.capture, ids.shape[1], settings.max_new_tokens, settings.rows)
        traces = self._new_traces(prompt, ids, settings, rules, seeds)
        for trace in traces:
            trace.images = {} if made is None else made.layout.as_dict()
        run = Run(settings, self.model, self.tokenizer, ids, traces, rules,
                  [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds], session=self,
                  stop_event=self._stop, token_text=self.token_text, images=made, features=tuple(saes))
        return Generation(self, run, interventions)

    def _new_traces(self, prompt: str, ids: torch.Tensor, settings: GenerationSettings, rules: StopRules,
                    seeds: tuple[int, ...]) -> list[Trace]:
        """One empty Trace per row, its metadata recorded (the sampler's or the beams' settings, the row's seed)."""
        created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        config = settings.beam.config() if settings.beam is not None else settings.sampler.config()
        traces = []
        for row_seed in seeds:
            meta = TraceMeta(model=self.model_id, dtype=self.info.dtype, device=self.info.device, sampler=config,
                             seed=row_seed, max_new_tokens=settings.max_new_tokens, chat=settings.chat,
                             stop=[*rules.stop_strings, *sorted(rules.stop_ids)], labkit_version=__version__,
                             created=created)
            traces.append(Trace(prompt=prompt, prompt_ids=ids[0].tolist(), steps=[], meta=meta))
            traces[-1]._owner = weakref.ref(self)  # Trace.attribute finds its Session (not saved with the Trace)
        return traces

    def _check_capture_memory(self, capture: Sequence[str], prompt_length: int, steps: int, rows: int) -> None:
        """Refuse, before the first token, per-step captures whose total over ``steps`` steps of ``rows`` sequences
        exceeds the memory budget: an attention row (L, H, T) grows with the context, logits are V floats a step,
        a site's activation d_model (or H·d_head) floats a step."""
        from labkit.core import memory

        i = self.info
        per_step = {"logits": i.vocab_size * 4}
        need = 0
        for name in capture:
            if name == "attention":  # Σ over steps of L·H·(prompt + t) float32 scores
                need += i.n_layers * i.n_heads * 4 * (steps * prompt_length + steps * (steps + 1) // 2)
            else:
                width = i.n_heads * i.head_dim if name.endswith("attn.z") else memory.Shape.of(self.model).d_model
                need += steps * per_step.get(name, width * 4)
        if need:
            memory.check(need * rows, f"capture={list(capture)} over {steps} steps of {rows} sequence(s) after a "
                         f"{prompt_length}-token prompt", "cpu",
                         "capture fewer things, lower max_new_tokens, or use a shorter prompt")

    def generate(self, prompt: str, max_new_tokens: int = 64, sampler: Sampler | None = None,
                 seed: int | None = None, stop: str | int | Sequence[str | int] | None = None, chat: bool = False,
                 capture: Sequence[str] = (), top_k: int = 10, interventions: Sequence[Any] = (),
                 on_step: Callable[[Step], None] | None = None, speculative: Any = None,
                 metrics: Sequence[str] = (), kv: Any = None, n: int | None = None, beam: Any = None, *,
                 settings: GenerationSettings | None = None, images: Any = None) -> Any:
        """Generate up to ``max_new_tokens`` tokens after ``prompt`` and return the instrumented Trace.

        ``n`` (an integer ≥ 1) decodes n sequences of the prompt together, in one batched forward pass per token,
        and returns a list of n Traces: trace b is exactly the single run with ``seed + b`` (its ``meta.seed``),
        whatever n is; ``seed=[s0, s1, ...]`` does the same with those seeds. Samplers, token-level
        interventions and per-Step measures act on each row as on one run.

        ``sampler=None`` is greedy; ``seed`` makes sampling reproducible (a random seed is drawn and recorded
        when None); ``stop`` takes strings and/or token ids (EOS always stops); ``chat`` applies the chat
        template; ``top_k`` alternatives are recorded per step; ``interventions`` (labkit.interventions) are
        switched on for this call only, after those of any open :meth:`intervene` scope. :meth:`stop` or
        KeyboardInterrupt end the generation between tokens and return the partial Trace. ``on_step(step)`` is
        called after every step (a place to move sliders: sampler parameters are read afresh at each step).
        ``speculative`` (a draft from :mod:`labkit.speculative`, e.g. ``PromptLookupDraft()``) decodes
        speculatively: same output distribution (same tokens for greedy), each Step records its round and whether
        it was drafted; ``trace.meta.speculative`` holds the SpeculativeStats. Not with a stateful sampler
        (Mirostat, Entropix) or ``capture=["attention"]``. ``metrics`` names registered metrics
        (:func:`labkit.measures.information.register`, e.g. ``"effective_vocab_size"``) recorded per Step in
        ``Step.metrics``
        and as ``metric.<name>`` columns of ``to_pandas()``. ``beam`` (a
        :class:`~labkit.sampling.beam.BeamSearch`, or a number of beams) makes it a beam search instead of sampling.

        ``settings`` (a :class:`~labkit.decoding.settings.GenerationSettings`) gives them all at once, as
        transformers' ``generation_config``: the keyword arguments given beside it override its fields.

        ``images`` (a vision-language model: PIL images, arrays or paths, one per ``<image>`` mark of the prompt) go
        into the prefill; ``trace.images`` records where each image token sits (:mod:`labkit.model.vlm`).
        """
        if on_step is not None and not callable(on_step):
            raise InvalidArgument(f"on_step must be a callable taking a Step, or None; got {on_step!r}")
        capture, saes = _feature_captures(capture)
        settings = _settings(settings, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, stop=stop,
                             chat=chat, capture=capture, top_k=top_k, interventions=interventions,
                             speculative=speculative, metrics=metrics, kv=kv, n=n, beam=beam)
        gen = self._start(prompt, settings, images, saes)
        with gen:  # closed on every exit: lock released, hooks removed, partial trace kept
            try:
                for step in gen:
                    if on_step is not None:
                        on_step(step)
            except KeyboardInterrupt:  # arrived between two steps rather than inside the loop
                _cut(gen, "interrupted")
            except BaseException:
                _cut(gen, "error")  # the callback's exception propagates; s.last_trace keeps the steps
                raise
        return gen.traces if settings.batched else gen.trace

    def uncertainty(self, prompt: str, n: int = 10, seed: int = 0, max_new_tokens: int = 32, sampler: Any = None,
                    stop: Any = None, chat: bool = False, normalize: Callable[[str], str] | None = None,
                    equivalent: Callable[[str, str], bool] | None = None) -> Any:
        """Sequence-level uncertainty of ``prompt``'s answers from ``n`` samples (one batched generation): NLLs
        (nats, bits), token entropies (bits), predictive and semantic entropy (bits); see
        :mod:`labkit.measures.uncertainty`. ``normalize`` (text -> answer) or ``equivalent(a, b)`` decide which answers
        mean
        the same (default: :func:`~labkit.measures.uncertainty.normalize_answer`)."""
        from labkit.measures import uncertainty as unc

        return unc.uncertainty(self, prompt, n=n, seed=seed, max_new_tokens=max_new_tokens, sampler=sampler,
                               stop=stop, chat=chat, normalize=normalize or unc.normalize_answer,
                               equivalent=equivalent)

    @contextlib.contextmanager
    def intervene(self, *interventions: Any) -> Iterator[Session]:
        """Switch interventions on inside a ``with`` block: activation-level hooks are registered on enter and
        removed on exit (also when the body raises), so every forward pass inside runs with them; token-level
        ones apply to every generation inside. They compose in the order given, after enclosing scopes'."""
        items = self._bound(interventions)
        with activated(self, items, bind=False) as token_level:
            self._scoped.extend(token_level)
            try:
                yield self
            finally:
                del self._scoped[len(self._scoped) - len(token_level):]

    def _bound(self, interventions: Any) -> list[Any]:
        """The interventions checked and bound to this session (token text resolved, layers checked, reference
        runs made), while no generation runs."""
        items = check_interventions(interventions)
        with self.exclusive():
            for item in items:
                item.bind(self)
        return items

    def stop(self) -> None:
        """Ask the running generation (if any) to end before its next token."""
        self._stop.set()


def _feature_captures(capture: Any) -> tuple[Any, list[Any]]:
    """``capture`` with each SAE in it replaced by the site it reads (that site's vector is what the Step keeps),
    and the SAEs."""
    from labkit.features.sae import SAE

    if isinstance(capture, str) or not isinstance(capture, Sequence):
        return capture, []
    saes = [c for c in capture if isinstance(c, SAE)]
    names = [c for c in capture if not isinstance(c, SAE)]
    return (tuple(dict.fromkeys([*names, *(sae.site for sae in saes)])), saes) if saes else (capture, [])


def _check_forced_steps(interventions: Sequence[Any], max_new_tokens: int) -> None:
    """A ForceTokens step at or beyond ``max_new_tokens`` would never apply: refuse it before the first token."""
    from labkit.interventions.token import ForceTokens

    for item in interventions:
        late = sorted(s for s in item.tokens if s >= max_new_tokens) if isinstance(item, ForceTokens) else []
        if late:
            raise InvalidArgument(f"{item!r} forces steps {late}, but max_new_tokens={max_new_tokens} ends the "
                                  f"generation at step {max_new_tokens - 1}")


def _foil(foil: Any, against: Any) -> Any:
    """``foil``, or the deprecated ``against=`` spelling of it (not both)."""
    if against is None:
        return foil
    if foil is not None:
        raise InvalidArgument("give the foil once: foil=..., not also against=...")
    deprecated("logit_attribution(against=...) is now foil=... (the name attribute() uses)")
    return against


def _settings(settings: GenerationSettings | None, **arguments: Any) -> GenerationSettings:
    """The settings of a ``generate``/``stream`` call: ``settings`` with the arguments that differ from their
    defaults overriding its fields (transformers' ``generation_config`` rule), or the arguments alone."""
    if settings is None:
        return GenerationSettings(**arguments)
    if not isinstance(settings, GenerationSettings):
        raise InvalidArgument(f"settings must be a labkit GenerationSettings or None; got {type(settings).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(GenerationSettings) if f.init}
    changed = {k: v for k, v in arguments.items() if not (v is defaults[k] or (v == defaults[k]) is True)}
    return settings.replace(**changed) if changed else settings


def _cut(gen: Generation, reason: str) -> None:
    """End ``gen`` because its consumer raised (``reason`` "error") or was interrupted: rows still running when it
    was closed get ``reason``; rows that had already ended (EOS, a stop rule) keep theirs."""
    gen.close()
    for trace in gen.traces:
        if trace.stop_reason == "stopped":
            trace.stop_reason = reason


class Generation:
    """A generation in progress: iterate it for Steps; ``trace`` holds every step made so far.

    It holds the Session (and any activation hooks) from its first step until it ends, :meth:`close` is called, the
    ``with`` block it is used in exits, or it is dropped (a ``break`` out of ``for st in s.stream(...)``, an exception
    in the loop's body): the iterator keeps no reference to this object, so dropping it cleans up at once, without
    waiting for the garbage collector. The consumer's code between steps runs outside torch's inference mode."""

    def __init__(self, session: Session, run: Run, interventions: list[Any]) -> None:
        self.session = session
        self.settings = run.settings
        """The generation's :class:`~labkit.decoding.settings.GenerationSettings`."""
        self.traces = run.traces
        """Every sequence of the generation (one unless ``n`` was given)."""
        self.trace = run.traces[0]
        self._steps = _run(session, run, interventions)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> Step:
        return next(self._steps)

    def close(self) -> None:
        """End the generation now (keeps the steps made); releases the Session and removes the hooks."""
        self._steps.close()

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        steps = getattr(self, "_steps", None)
        if steps is not None:
            steps.close()


def _run(s: Session, run: Run, interventions: list[Any]) -> Iterator[Step]:
    """The steps of one generation, with the Session held and the interventions attached. A plain function, not a
    method: the generator must not reference its Generation (see there)."""
    try:
        with s.exclusive(), s._with_images(run.images), activated(s, interventions, bind=False) as token_level:
            s._stop.clear()
            run.interventions = [*s._scoped, *token_level]
            for step in loop.generate(run):
                for sae in run.features:  # an SAE in capture=: its top features at the predicting position
                    step.captures[f"features:{sae.name}"] = top_features(sae, step.captures[sae.site])
                yield step
    finally:
        s.last_trace = run.traces[0]
