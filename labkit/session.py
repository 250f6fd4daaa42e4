"""Session: one loaded model and the verbs a notebook user types (next_token, generate, stream, stop)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import secrets
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from labkit import __version__, beam, decode, info, models
from labkit.errors import InvalidArgument, SessionBusy, check_int, invalid_choice
from labkit.interventions.base import activated, check_interventions
from labkit.kv import check_kv, parse_kv
from labkit.results import Distribution, Score
from labkit.sampling.base import Greedy, Sampler
from labkit.sampling.beam import BeamSearch
from labkit.speculative import Speculator, check_speculative
from labkit.tokens import TokenTexts, token_id
from labkit.trace import Step, Trace, TraceMeta

CAPTURES: tuple[str, ...] = ("attention", "logits")
"""Extra per-step captures ``generate(capture=...)`` accepts, besides hook-site names (``"blocks.3.resid_post"``)."""


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
    ``Session.model`` and ``Session.tokenizer`` are the transformers objects. A Session may be used from a
    background thread and the notebook at once: one generation runs at a time, a second gets SessionBusy.
    """

    def __init__(self, model: Any = "default", device: str = "auto", dtype: str = "auto",
                 quantization: str | None = None, attn: str = "auto", progress: bool = True, *,
                 tokenizer: Any = None, revision: str | None = None, device_map: Any = None, max_memory: Any = None,
                 offload_folder: str | os.PathLike[str] | None = None) -> None:
        self.model, self.tokenizer, self.info = models.load(
            model, device=device, dtype=dtype, quantization=quantization, attn=attn, progress=progress,
            tokenizer=tokenizer, revision=revision, device_map=device_map, max_memory=max_memory,
            offload_folder=offload_folder)
        self.device = torch.device(self.info.device)
        self._lock = threading.Lock()  # not re-entrant: a generation started from inside another is refused
        self._stop = threading.Event()
        self._texts = TokenTexts(self.tokenizer)
        self._scoped: list[Any] = []  # token-level interventions of open `intervene` scopes, outermost first
        self.last_trace: Trace | None = None
        """The Trace of the latest generation, however it ended (also when a callback raised)."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any) -> Session:
        """A Session over a transformers causal LM already loaded in this process (one you quantised, edited,
        placed with ``device_map``, or a PEFT model), used as it is: same weights, device(s) and dtype."""
        return cls(model, tokenizer=tokenizer)

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
        """The model's hook sites (:class:`labkit.hooks.Sites`): ``list(s.sites)`` gives every site name
        (``"blocks.3.resid_post"``...), ``s.sites.table()`` their shapes and meaning, ``s.sites.read([...])`` and
        ``s.sites.edit({...})`` scoped reads and edits. UnsupportedArchitecture when labkit has no adapter for
        the model (declare one with :func:`labkit.hooks.register_adapter`)."""
        from labkit.hooks import sites_of

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

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise SessionBusy("this Session is busy with a generation (in another thread, or the one this call was "
                              "made from, e.g. inside on_step or a stream's loop); wait for it to end, or call "
                              "session.stop()")
        try:
            yield
        finally:
            self._lock.release()

    # -- verbs -------------------------------------------------------------------------------------------
    def next_token(self, prompt: str, chat: bool = False) -> Distribution:
        """The next-token distribution after ``prompt`` (no sampler). Outside any :meth:`intervene` scope it is the
        model's raw distribution; inside one, the scope's interventions apply — activation-level ones in the forward
        pass, token-level ones to the logits as at a generation's first step — and ``Distribution.interventions``
        names the token-level ones that changed it."""
        from labkit.interventions.base import InterventionContext, apply_all

        ids = self.encode(prompt, chat=chat, reserve=0)
        with self._exclusive(), torch.inference_mode():
            logits = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1:].float()  # (1, V)
            logits, changed = apply_all(logits, InterventionContext(0, [], ids[0].tolist(), self), self._scoped)
            logprobs = torch.log_softmax(logits[0], dim=-1).cpu()  # (V,) nats
        return Distribution(logprobs=logprobs, tokenizer=self.tokenizer, prompt=prompt, interventions=changed)

    def score(self, text: str, chat: bool = False) -> Score:
        """Per-token surprisal, entropy and rank of ``text``'s own tokens, and its perplexity (one forward pass; the
        logits over the vocabulary are made a chunk of positions at a time, sized by the memory budget)."""
        ids = self.encode(text, chat=chat)
        if ids.shape[1] < 2:
            raise InvalidArgument(f"text must be at least 2 tokens to score; {text!r} is {ids.shape[1]}")
        chosen, ranks, entropies = [], [], []
        with self._exclusive(), torch.inference_mode():
            for start, logits in self._logits_in_chunks(ids, 0, ids.shape[1] - 1):  # (R, V) predicting start+1..
                logp = torch.log_softmax(logits, dim=-1)  # (R, V) nats
                actual = ids[0, start + 1:start + 1 + logits.shape[0]].to(logp.device)  # (R,)
                picked = logp.gather(-1, actual[:, None])  # (R, 1)
                chosen.append(picked[:, 0].cpu())
                ranks.append(((logp > picked).sum(-1) + 1).cpu())  # (R,)
                entropies.append(info.entropy_and_varentropy(logp, "bits")[0].cpu())  # (R,)
        token_ids = ids[0].tolist()
        return Score(text=text, token_ids=token_ids, tokens=[self._texts(i) for i in token_ids],
                     logprobs=torch.cat(chosen).tolist(), entropy_bits=torch.cat(entropies).tolist(),
                     rank=torch.cat(ranks).tolist())

    def _logits_in_chunks(self, ids: torch.Tensor, first: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, logits)`` over positions ``first``..``stop``−1 of ``ids`` (1, T): float32 (R, V) a chunk of R
        positions at a time, R sized by the memory budget. One forward pass keeps the final norm's output (T,
        d_model); each chunk goes through the model's own unembedding (and final softcapping). Checked against the
        model's own logits at the last position; a model without hook sites is run whole, after a memory check."""
        from labkit import memory
        from labkit.errors import UnsupportedArchitecture

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

    def compare(self, prompts: Sequence[str], token: str | int, chat: bool = False) -> Any:
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
            rows.append({"prompt": prompt, "token": self._texts(tid), "prob": float(lp.exp()), "logprob": float(lp),
                         "rank": int((d.logprobs > lp).sum()) + 1, "entropy_bits": d.entropy("bits")})
        return pd.DataFrame(rows)

    compare_token_probabilities = compare  # the name seed 000 uses

    def attention(self, prompt: str, chat: bool = False, layers: Sequence[int] | None = None,
                  heads: Sequence[int] | None = None, dtype: str = "float32") -> Any:
        """Full attention matrices of ``prompt``: AttentionMaps with probs of shape (L, H, T, T) for ``layers`` and
        ``heads`` (default: all), stored in ``dtype`` ("float32" | "float16" | "bfloat16") on the CPU. They equal
        eager attention's ``output_attentions``, computed a block of query rows at a time beside the model's own
        attention. Their memory, L·H·T²·(bytes per value), is checked against the budget first
        (:mod:`labkit.memory`): MemoryBudgetExceeded names the bytes and how to need less."""
        from labkit import memory
        from labkit.attention import MAP_DTYPES, AttentionMaps, attention_maps

        if dtype not in MAP_DTYPES:
            raise invalid_choice("dtype", dtype, tuple(MAP_DTYPES))
        layer_list = self._indices("layers", layers, self.info.n_layers)
        head_list = self._indices("heads", heads, self.info.n_heads)
        ids = self.encode(prompt, chat=chat)
        length, torch_dtype = ids.shape[1], MAP_DTYPES[dtype]
        kept = len(layer_list) * len(head_list) * length * length * torch_dtype.itemsize
        memory.check(kept, f"attention maps of {len(layer_list)} layers × {len(head_list)} heads over {length} "
                     f"tokens ({dtype})", "cpu", "choose fewer layers= or heads=, dtype='float16', or a shorter prompt")
        with self._exclusive():
            maps = attention_maps(self.model, ids, layer_list, head_list, torch_dtype)
        probs = torch.stack([maps[layer] for layer in layer_list])  # (L_sel, H_sel, T, T)
        return AttentionMaps(probs=probs, tokens=[self._texts(i) for i in ids[0].tolist()], layers=layer_list,
                             heads=head_list)

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

    def lens(self, prompt: str, chat: bool = False, k: int = 5) -> Any:
        """Logit lens after ``prompt``: each layer's next-token distribution (LogitLens, shape (L, V))."""
        from labkit.lens import logit_lens

        check_int("k", k, 1, self.info.vocab_size)
        ids = self.encode(prompt, chat=chat)
        with self._exclusive():
            return logit_lens(self.model, ids, self._texts, k=k)

    def teacher_forced_logits(self, trace: Trace) -> torch.Tensor:
        """Shape (n, V): the model's raw logits at each of ``trace``'s n steps, recomputed in one full-cache forward
        pass over the prompt and the generated tokens (what a full cache would have given on the same tokens). The
        result (n·V float32 values) is checked against the memory budget first; it is made in chunks."""
        from labkit import memory

        if not isinstance(trace, Trace) or not trace.steps:
            raise InvalidArgument("trace must be a labkit Trace with at least one step")
        n = len(trace)
        memory.check(n * self.info.vocab_size * 4, f"teacher-forced logits of {n} steps", "cpu",
                     "use a trace with fewer steps (trace.steps[:k] in a new Trace)")
        ids = torch.tensor([[*trace.prompt_ids, *trace.token_ids[:-1]]], device=self.device)
        length = ids.shape[1]
        out = torch.empty(n, self.info.vocab_size)  # (n, V) on the CPU
        with self._exclusive(), torch.inference_mode():
            for start, logits in self._logits_in_chunks(ids, length - n, length):
                out[start - (length - n):start - (length - n) + logits.shape[0]] = logits.cpu()
        return out

    # -- why: activations and attribution ------------------------------------------------------------------
    def activations(self, prompt: str, sites: Sequence[str], chat: bool = False) -> Any:
        """The activations at hook ``sites`` (names from ``list(s.sites)``) of one forward pass over ``prompt``:
        an :class:`labkit.activations.Activations` — ``acts["blocks.3.resid_post"]`` has shape (T, d_model),
        ``blocks.L.attn.z`` (T, H, d_head); ``save``/``load`` (safetensors), ``to_pandas()`` (norms)."""
        from labkit.activations import Activations, check_site_names, run_with_cache

        names = check_site_names(self.sites, sites)
        ids = self.encode(prompt, chat=chat)
        with self._exclusive():
            tensors = run_with_cache(self.sites, ids, names)
        return Activations(tensors=tensors, tokens=[self._texts(i) for i in ids[0].tolist()],
                           token_ids=ids[0].tolist(), prompt=prompt, model=self.model_id,
                           meta={"dtype": self.info.dtype, "chat": str(chat)})

    def attribute(self, prompt: str, target: str | int | None = None, foil: str | int | None = None,
                  method: str = "ig", position: int | None = None, quantity: str = "prob", steps: int = 64,
                  batch: int | None = None, baseline: str = "unk", chat: bool = False, max_steps: int = 512,
                  tolerance: float = 0.01) -> Any:
        """Why the model predicts ``target`` after ``prompt``: an :class:`labkit.attribution.Attribution` with one
        score per prompt token. ``method`` "saliency" | "input_x_gradient" | "ig" | "rollout"; ``quantity`` the
        target's "prob" (default, as inseq) | "logprob" (nats) | "logit"; ``foil`` makes it a contrast
        f(target) − f(foil). ``target`` None: the prompt's own next token at ``position`` (default: the last
        position, whose target is the model's top prediction). ``steps``/``batch``/``baseline`` ("unk", inseq's
        default | "zero" | "mean"): IG's points, points per forward pass (default: what the memory budget holds) and
        starting point. IG's rule is adaptive (:func:`labkit.attribution.adaptive_ig`): intervals of 8 points are
        halved where their own completeness residual is largest until the residuals add up to ``tolerance`` (1 %)
        or ``max_steps`` points are used — on a CPU a 259-token text of the default model needed 368 points, about
        6 minutes on 2 cores; read ``completeness_error``."""
        from labkit.attribution import attribute

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
        from labkit.attribution import attribute

        ids, token = self._step_context(trace, index)
        return self._attribute(ids, token if target is None else target, foil, method, None, quantity, steps, batch,
                               baseline, attribute, max_steps, tolerance)

    def _attribute(self, ids: torch.Tensor, target: Any, foil: Any, method: str, position: int | None,
                   quantity: str, steps: int, batch: int | None, baseline: str, attribute: Callable[..., Any],
                   max_steps: int = 512, tolerance: float = 0.01) -> Any:
        from labkit.attribution import check_baseline, check_method, check_quantity

        check_method(method)
        check_quantity(quantity)
        check_baseline(baseline)
        length = ids.shape[1]
        if position is not None:
            check_int("position", position, -length, length - 1)
        where = (length - 1) if position is None else position % length
        foil_id = None if foil is None else token_id(self.tokenizer, foil)
        with self._exclusive():
            if target is None and where < length - 1:
                target_id = int(ids[0, where + 1])
            elif target is None:
                with torch.inference_mode():
                    target_id = int(self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].argmax())
            else:
                target_id = token_id(self.tokenizer, target)
            return attribute(self.sites, ids, target_id, foil=foil_id, method=method, position=where,
                             quantity=quantity, steps=steps, batch=batch, baseline=baseline, token_text=self._texts,
                             tokenizer=self.tokenizer, max_steps=max_steps, tolerance=tolerance)

    def logit_attribution(self, prompt: str, token: str | int | None = None, against: str | int | None = None,
                          chat: bool = False) -> Any:
        """Direct logit attribution at the last position of ``prompt``: the logit of ``token`` (default: the top
        prediction), or the difference to ``against``, split into the embedding, each layer's attention (and each
        head) and MLP, with the final norm's scale frozen (:class:`labkit.logit_attribution.LogitAttribution`)."""
        ids = self.encode(prompt, chat=chat)
        return self._logit_attribution(ids, token, against)

    def logit_attribution_step(self, trace: Trace, index: int, against: str | int | None = None) -> Any:
        """:meth:`logit_attribution` of step ``index``'s token, with the prompt and earlier tokens as context."""
        ids, token = self._step_context(trace, index)
        return self._logit_attribution(ids, token, against)

    def _logit_attribution(self, ids: torch.Tensor, token: Any, against: Any) -> Any:
        from labkit.logit_attribution import decompose

        against_id = None if against is None else token_id(self.tokenizer, against)
        with self._exclusive():
            if token is None:
                with torch.inference_mode():
                    token = int(self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].argmax())
            return decompose(self.sites, ids, token_id(self.tokenizer, token), against_id, token_text=self._texts)

    def _step_context(self, trace: Trace, index: int) -> tuple[torch.Tensor, int]:
        """The ids (1, T + index) a generation's step ``index`` saw, and its token id."""
        if not isinstance(trace, Trace):
            raise InvalidArgument(f"trace must be a labkit Trace; got {type(trace).__name__}")
        if trace.meta.model != self.model_id:
            raise InvalidArgument(f"the trace was generated by {trace.meta.model!r}; this Session holds "
                                  f"{self.model_id!r}")
        check_int("index", index, -len(trace), len(trace) - 1)
        index %= len(trace)
        ids = [*trace.prompt_ids, *trace.token_ids[:index]]
        return torch.tensor([ids], dtype=torch.long, device=self.device), trace.steps[index].token_id

    def stream(self, prompt: str, max_new_tokens: int = 64, sampler: Sampler | None = None, seed: int | None = None,
               stop: str | int | Sequence[str | int] | None = None, chat: bool = False,
               capture: Sequence[str] = (), top_k: int = 10, interventions: Sequence[Any] = (),
               speculative: Any = None, metrics: Sequence[str] = (), kv: Any = None,
               n: int | None = None) -> Generation:
        """Start a generation; iterate the result for Steps as they are made (``.trace`` holds them all; with ``n``,
        ``.traces`` holds the n sequences and their Steps arrive row by row within each token).

        Arguments are those of :meth:`generate`. The Session is held until the iteration ends or is closed.
        """
        check_int("max_new_tokens", max_new_tokens, 1)
        listed = list(seed) if isinstance(seed, (list, tuple)) else None  # seeds of a batch, one per row
        if listed is not None:
            if not listed or (n is not None and n != len(listed)):
                raise InvalidArgument(f"seed as a list gives one seed per sequence (n = its length); got {seed!r} "
                                      f"with n={n!r}")
            n = len(listed)
        if n is not None:
            check_int("n", n, 1, 4096)
            if n > 1 and (speculative is not None or (kv is not None and parse_kv(kv).spec != "full")):
                raise InvalidArgument(f"n={n} decodes a batch of sequences; speculative decoding and lossy kv "
                                      "policies work on one sequence: use n=None (or n=1) with them")
        if max_new_tokens >= self.info.context_length:
            raise InvalidArgument(f"max_new_tokens must be below the model's context of {self.info.context_length} "
                                  f"tokens (prompt included); got {max_new_tokens}")
        check_int("top_k", top_k, 1, self.info.vocab_size)
        sampler = _check_sampler(sampler)
        if isinstance(capture, str) or not isinstance(capture, Sequence):
            raise InvalidArgument(f"capture must be a list of names from {list(CAPTURES)} and hook-site names; got "
                                  f"{capture!r}")
        for name in capture:
            if name not in CAPTURES and (not isinstance(name, str) or not name.startswith(("blocks.", "embed",
                                                                                           "final_norm"))):
                raise InvalidArgument(f"capture must be a list of names from {list(CAPTURES)} and hook-site names "
                                      f"such as 'blocks.0.resid_post' (list(session.sites)); got {name!r}")
            if name not in CAPTURES:
                self.sites.resolve(name)  # an unknown site is refused with the close names
        if isinstance(metrics, str):
            raise InvalidArgument(f"metrics must be a list of registered metric names; got {metrics!r}")
        metrics = tuple(info.metric(name).name for name in metrics)  # an unknown name lists the registered ones
        lossy = kv is not None and parse_kv(kv).spec != "full"
        if isinstance(sampler, BeamSearch) and (n not in (None, 1) or speculative is not None or lossy
                                                or any(c != "logits" for c in capture)):
            raise InvalidArgument("beam search (sampler=BeamSearch(...)) runs its beams as the batch: it does not "
                                  "take n, speculative, a lossy kv policy or captures other than 'logits'")
        draft = check_speculative(speculative, sampler, capture)
        policy = None if kv is None else parse_kv(kv)
        if policy is not None:
            check_kv(policy, speculative, capture, self.model.config)
        interventions = self._bound(interventions)  # errors (bad layer, token text) surface here
        with self._exclusive():
            sampler.bind(self)  # a sampler reading layers or loading an amateur model; its errors surface here
            if draft is not None:
                draft.bind(self)  # loads a draft model once; errors (tokenizer, layers) surface here
        for one in listed or [seed]:
            if one is not None and (isinstance(one, bool) or not isinstance(one, int) or not 0 <= one < 2**63):
                raise InvalidArgument(f"seed must be an integer in [0, 2**63), a list of them, or None; got {seed!r}")
        _check_forced_steps(interventions, max_new_tokens)
        stop_ids, stop_strings = self._stop_rules(stop)
        ids = self.encode(prompt, chat=chat, reserve=max_new_tokens)
        self._check_capture_memory(capture, ids.shape[1], max_new_tokens, n or 1)
        used_seed = seed if isinstance(seed, int) else secrets.randbits(63)
        seeds = listed or [(used_seed + b) % 2**63 for b in range(n or 1)]  # row b = the single run with seed + b
        generators = [torch.Generator(device=self.device).manual_seed(row_seed) for row_seed in seeds]
        created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        traces = []
        for row_seed in seeds:
            meta = TraceMeta(model=self.model_id, dtype=self.info.dtype, device=self.info.device,
                             sampler=sampler.config(), seed=row_seed, max_new_tokens=max_new_tokens, chat=chat,
                             stop=[*stop_strings, *sorted(stop_ids)], labkit_version=__version__, created=created)
            traces.append(Trace(prompt=prompt, prompt_ids=ids[0].tolist(), steps=[], meta=meta))
            traces[-1]._owner = weakref.ref(self)  # Trace.attribute finds its Session (not saved with the Trace)
        rules = decode.StopRules(max_new_tokens=max_new_tokens, eos_ids=self.eos_ids, stop_ids=stop_ids,
                                 stop_strings=stop_strings)
        return Generation(self, ids, traces, sampler, rules, generators, top_k, tuple(capture), interventions,
                          Speculator(draft, rules.eos_ids | rules.stop_ids) if draft is not None else None, metrics,
                          policy)

    def _check_capture_memory(self, capture: Sequence[str], prompt_length: int, steps: int, rows: int) -> None:
        """Refuse, before the first token, per-step captures whose total over ``steps`` steps of ``rows`` sequences
        exceeds the memory budget: an attention row (L, H, T) grows with the context, logits are V floats a step,
        a site's activation d_model (or H·d_head) floats a step."""
        from labkit import memory

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
                 metrics: Sequence[str] = (), kv: Any = None, n: int | None = None) -> Any:
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
        (:func:`labkit.info.register`, e.g. ``"effective_vocab_size"``) recorded per Step in ``Step.metrics``
        and as ``metric.<name>`` columns of ``to_pandas()``.
        """
        if on_step is not None and not callable(on_step):
            raise InvalidArgument(f"on_step must be a callable taking a Step, or None; got {on_step!r}")
        gen = self.stream(prompt, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, stop=stop, chat=chat,
                          capture=capture, top_k=top_k, interventions=interventions, speculative=speculative,
                          metrics=metrics, kv=kv, n=n)
        with gen:  # closed on every exit: lock released, hooks removed, partial trace kept
            try:
                for step in gen:
                    if on_step is not None:
                        on_step(step)
            except KeyboardInterrupt:  # arrived between two steps rather than inside the loop
                gen.close()
                for trace in gen.traces:
                    trace.stop_reason = "interrupted"
            except BaseException:
                gen.close()
                for trace in gen.traces:
                    trace.stop_reason = "error"  # the callback's exception propagates; s.last_trace keeps the steps
                raise
        return gen.trace if n is None and not isinstance(seed, (list, tuple)) else gen.traces

    def uncertainty(self, prompt: str, n: int = 10, seed: int = 0, max_new_tokens: int = 32, sampler: Any = None,
                    stop: Any = None, chat: bool = False, normalize: Callable[[str], str] | None = None,
                    equivalent: Callable[[str, str], bool] | None = None) -> Any:
        """Sequence-level uncertainty of ``prompt``'s answers from ``n`` samples (one batched generation): NLLs
        (nats, bits), token entropies (bits), predictive and semantic entropy (bits); see
        :mod:`labkit.uncertainty`. ``normalize`` (text -> answer) or ``equivalent(a, b)`` decide which answers mean
        the same (default: :func:`~labkit.uncertainty.normalize_answer`)."""
        from labkit import uncertainty as unc

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
        with self._exclusive():
            for item in items:
                item.bind(self)
        return items

    def stop(self) -> None:
        """Ask the running generation (if any) to end before its next token."""
        self._stop.set()

    def _stop_rules(self, stop: Any) -> tuple[frozenset[int], tuple[str, ...]]:
        items = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
        ids: set[int] = set()
        strings: list[str] = []
        for item in items:
            if isinstance(item, str):
                if item == "":
                    raise InvalidArgument("stop strings must not be empty")
                strings.append(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                if not 0 <= item < self.info.vocab_size:
                    raise InvalidArgument(f"stop token ids must be in [0, {self.info.vocab_size}); got {item}")
                ids.add(token_id(self.tokenizer, item))
            else:
                raise InvalidArgument(f"stop must hold strings and token ids; got {item!r}")
        return frozenset(ids), tuple(strings)


def _check_forced_steps(interventions: Sequence[Any], max_new_tokens: int) -> None:
    """A ForceTokens step at or beyond ``max_new_tokens`` would never apply: refuse it before the first token."""
    from labkit.interventions.token import ForceTokens

    for item in interventions:
        late = sorted(s for s in item.tokens if s >= max_new_tokens) if isinstance(item, ForceTokens) else []
        if late:
            raise InvalidArgument(f"{item!r} forces steps {late}, but max_new_tokens={max_new_tokens} ends the "
                                  f"generation at step {max_new_tokens - 1}")


def _check_sampler(sampler: Any) -> Sampler:
    if sampler is None:
        return Greedy()
    if not isinstance(sampler, Sampler):
        raise InvalidArgument(f"sampler must be a labkit sampler (e.g. labkit.sampling.Classic()) or None for "
                              f"greedy; got {type(sampler).__name__}")
    return sampler


class Generation:
    """A generation in progress: iterate it for Steps; ``trace`` holds every step made so far.

    It holds the Session (and any activation hooks) from its first step until it ends, :meth:`close` is called, the
    ``with`` block it is used in exits, or it is dropped (a ``break`` out of ``for st in s.stream(...)``, an exception
    in the loop's body): the iterator keeps no reference to this object, so dropping it cleans up at once, without
    waiting for the garbage collector. The consumer's code between steps runs outside torch's inference mode."""

    def __init__(self, session: Session, ids: torch.Tensor, traces: list[Trace], sampler: Sampler,
                 rules: decode.StopRules, generators: list[torch.Generator], top_k: int, capture: tuple[str, ...],
                 interventions: list[Any], speculator: Speculator | None = None, metrics: tuple[str, ...] = (),
                 kv: Any = None) -> None:
        self.session = session
        self.traces = traces
        """Every sequence of the generation (one unless ``n`` was given)."""
        self.trace = traces[0]
        self._steps = _run(session, traces, ids, sampler, rules, generators, top_k, capture, interventions,
                           speculator, metrics, kv)

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


def _run(s: Session, traces: list[Trace], ids: torch.Tensor, sampler: Sampler, rules: decode.StopRules,
         generators: list[torch.Generator], top_k: int, capture: tuple[str, ...], interventions: list[Any],
         speculator: Speculator | None, metrics: tuple[str, ...], kv: Any) -> Iterator[Step]:
    """The steps of one generation, with the Session held and the interventions attached. A plain function, not a
    method: the generator must not reference its Generation (see there)."""
    try:
        with s._exclusive(), activated(s, interventions, bind=False) as token_level:
            s._stop.clear()
            if isinstance(sampler, BeamSearch):
                yield from beam.search(s.model, s.tokenizer, ids, traces[0], sampler, rules, stop_event=s._stop,
                                       top_k=top_k, token_text=s._texts, interventions=[*s._scoped, *token_level],
                                       session=s, metrics=metrics, keep_logits="logits" in capture,
                                       record_kv=kv is not None)
                return
            yield from decode.decode(s.model, s.tokenizer, ids, traces, sampler, rules, generator=generators,
                                     stop_event=s._stop, top_k=top_k, token_text=s._texts, capture=capture,
                                     interventions=[*s._scoped, *token_level], session=s, speculator=speculator,
                                     metrics=metrics, kv=kv)
    finally:
        s.last_trace = traces[0]
