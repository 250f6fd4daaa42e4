"""Training a small sparse autoencoder offline, on one site of the loaded model.

Written here rather than taken from a library: SAELens (the maintained trainer) pins TransformerLens < 4 and does not
install beside transformers 5; dictionary_learning and sparsify need their own model wrappers. The trainer is small:

- **activations**: the site's vectors over the given texts (files, a folder of ``.txt``, or strings), in windows of
  ``context`` tokens, the first position of each window left out (its norm is an outlier, as the field does);
  with no text at hand, text sampled from the model itself (:func:`sample_texts`);
- **scaling**: the vectors are scaled so that their mean squared norm is d_in while training, and the scale is
  folded back into the weights at the end, so the saved SAE reads the site's raw values;
- **TopK** (Gao et al. 2024): f = TopK(W_enc(x − b_dec) + b_enc), loss ‖x − x̂‖² (mean over the batch), decoder rows
  kept at unit norm; **ReLU + L1**: f = ReLU(…), loss ‖x − x̂‖² + λ Σ f_i ‖W_dec,i‖; Adam; b_dec starts at the data's
  mean, W_enc at W_decᵀ;
- **metrics** as the field reports them, on held-out activations (:class:`TrainReport`): L0, fraction of variance
  explained, dead features (never active there), and with a model the splice measures (KL in bits per token, loss
  recovered) of :func:`labkit.features.reading.splice_report`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from labkit.core.errors import InvalidArgument, check_int, invalid_choice
from labkit.features.reading import flat
from labkit.features.sae import SAE

TRAIN_ARCHITECTURES = ("topk", "relu")


@dataclass
class TrainReport:
    """How a trained SAE does on held-out activations (and, with a model, spliced into it)."""

    architecture: str
    d_in: int
    d_sae: int
    tokens: int
    """Activations trained on."""
    steps: int
    seconds: float
    l0: float
    """Mean active features per held-out vector."""
    fraction_of_variance_explained: float
    dead_fraction: float
    """Share of features never active on the held-out vectors."""
    splice: dict[str, float] = field(default_factory=dict)
    """With a model: :meth:`labkit.features.reading.SpliceReport.as_dict` on held-out texts (KL bits per token,
    loss recovered, ...)."""

    def as_dict(self) -> dict[str, Any]:
        """Every field (``labkit train-sae`` prints and saves this)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def read_texts(paths: Sequence[str | Path]) -> list[str]:
    """The texts of ``paths``: each file's text, each ``.txt``/``.md`` file of a folder (sorted); InvalidArgument for
    a path that is neither."""
    texts = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            texts += [f.read_text(encoding="utf-8", errors="replace") for f in sorted(path.rglob("*"))
                      if f.suffix in (".txt", ".md") and f.is_file()]
        elif path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
        else:
            raise InvalidArgument(f"text path {str(path)!r} is neither a file nor a folder")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InvalidArgument(f"no text found in {[str(p) for p in paths]}")
    return texts


def sample_texts(session: Any, n: int, max_new_tokens: int = 64, seed: int = 0,
                 prompts: Sequence[str] = ("The", "Once upon a time", "In the", "Scientists", "The city of",
                                           "I think", "Today", "Water")) -> list[str]:
    """``n`` texts sampled from the model itself (temperature 1, seeds ``seed``…), starting from short prompts:
    training text when none is at hand."""
    from labkit.sampling import Classic

    check_int("n", n, 1)
    out = []
    for i in range(n):
        trace = session.generate(prompts[i % len(prompts)], max_new_tokens=max_new_tokens, seed=seed + i,
                                 sampler=Classic(temperature=1.0))
        out.append(trace.prompt + trace.text)
    return out


def collect(session: Any, texts: Sequence[str], site: str, max_tokens: int = 20000, context: int = 128) -> torch.Tensor:
    """Shape (N, d): the site's vectors over ``texts`` in windows of ``context`` tokens (each window's first
    position left out), at most ``max_tokens`` of them, float32 on the CPU; its memory checked first."""
    from labkit.core import memory

    check_int("max_tokens", max_tokens, 1)
    check_int("context", context, 2)
    sites = session.sites
    sites.resolve(site)
    width = sites.n_heads * sites.head_dim if site.endswith("attn.z") else sites.d_model
    memory.check(max_tokens * width * 4 * 2, f"{max_tokens} activations of width {width}", "cpu",
                 "use fewer max_tokens")
    chunks, total = [], 0
    with session.exclusive(), torch.inference_mode():
        for text in texts:
            ids = session.tokenizer(text).input_ids
            for start in range(0, max(1, len(ids) - 1), context):
                window = ids[start:start + context]
                if len(window) < 2:
                    continue
                with sites.read([site]) as seen:
                    session.model(input_ids=torch.tensor([window], device=session.device), logits_to_keep=1)
                rows = flat(seen[site][0][0], site)[1:].float().cpu()  # (t − 1, d)
                chunks.append(rows[:max_tokens - total])
                total += len(chunks[-1])
                if total >= max_tokens:
                    return torch.cat(chunks)
    if not chunks:
        raise InvalidArgument("the texts gave no activations (each needs 2 tokens or more)")
    return torch.cat(chunks)


def fit(acts: torch.Tensor, d_sae: int, architecture: str = "topk", k: int = 32, l1: float = 5.0,
        steps: int = 2000, batch: int = 256, lr: float | None = None, seed: int = 0, progress: bool = False,
        site: str = "blocks.0.resid_post") -> SAE:
    """An SAE trained on ``acts`` (N, d) alone (no model needed: what the planted-feature test uses). ``lr``
    defaults to 2e-3 (TopK) or 1e-3 (ReLU + L1); ``l1`` is λ for ReLU + L1 (on scaled activations)."""
    if architecture not in TRAIN_ARCHITECTURES:
        raise invalid_choice("architecture", architecture, TRAIN_ARCHITECTURES)
    if acts.ndim != 2 or len(acts) < 2:
        raise InvalidArgument(f"acts must have shape (N ≥ 2, d); got {tuple(acts.shape)}")
    n, d = acts.shape
    check_int("d_sae", d_sae, 1)
    check_int("steps", steps, 1)
    check_int("batch", batch, 1)
    if architecture == "topk":
        check_int("k", k, 1, d_sae)
    gen = torch.Generator().manual_seed(seed)
    x_all = acts.float()
    scale = math.sqrt(d / float((x_all ** 2).sum(-1).mean()))  # mean squared norm d while training
    x_all = x_all * scale
    W_dec = torch.randn(d_sae, d, generator=gen)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    params = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec, "b_dec": x_all.mean(0)}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr or (2e-3 if architecture == "topk" else 1e-3))
    bar = _bar(steps, progress)
    for _ in range(steps):
        x = x_all[torch.randint(n, (min(batch, n),), generator=gen)]
        h = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        if architecture == "topk":
            top = h.topk(k, dim=-1)
            f = torch.zeros_like(h).scatter(-1, top.indices, torch.relu(top.values))
        else:
            f = torch.relu(h)
        recon = f @ params["W_dec"] + params["b_dec"]
        loss = ((recon - x) ** 2).sum(-1).mean()
        if architecture == "relu":
            loss = loss + l1 * (f * params["W_dec"].norm(dim=-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if architecture == "topk":
            with torch.no_grad():
                params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.detach().item():.3g}", refresh=False)
    if bar is not None:
        bar.close()
    with torch.no_grad():  # fold the training scale back: the SAE reads raw values
        w = {name: p.detach().clone() for name, p in params.items()}
        w["W_enc"] *= scale
        w["W_dec"] /= scale
        w["b_dec"] /= scale
    return SAE(W_enc=w["W_enc"], b_enc=w["b_enc"], W_dec=w["W_dec"], b_dec=w["b_dec"], site=site,
               architecture="topk" if architecture == "topk" else "standard", k=k if architecture == "topk" else None,
               name=f"{architecture}-{d_sae}",
               cfg={"metadata": {"hook_name": site}, "trained_by": "labkit", "training_steps": steps})


def _bar(steps: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc="training SAE", unit="step")


def held_out_metrics(sae: SAE, acts: torch.Tensor) -> tuple[float, float, float]:
    """(L0, fraction of variance explained, dead fraction) of ``sae`` on ``acts`` (N, d)."""
    with torch.no_grad():
        recon, f = sae.reconstruct(acts.to(sae.W_enc.device).float())
        x = acts.to(recon.device).float()
        fve = 1.0 - float(((x - recon) ** 2).sum()) / float(((x - x.mean(0)) ** 2).sum())
        return float((f > 0).float().sum(-1).mean()), fve, float(((f > 0).sum(0) == 0).float().mean())


def train_sae(session: Any, site: str, texts: Sequence[str] | None = None, *, d_sae: int | None = None,
              architecture: str = "topk", k: int = 32, l1: float = 5.0, steps: int = 2000, batch: int = 256,
              max_tokens: int = 20000, context: int = 128, sample: int = 32, seed: int = 0, progress: bool = True,
              save: str | Path | None = None) -> tuple[SAE, TrainReport]:
    """Train an SAE on ``site`` of ``session``'s model over ``texts`` (strings; None: ``sample`` texts sampled from
    the model itself), 90 % of the activations for training and 10 % held out for the metrics, and the splice
    measures on up to 8 held-out texts. ``d_sae`` defaults to 4 × the site's width. ``save``: a folder, written in
    SAELens' format. Returns the SAE (on the session's device) and its :class:`TrainReport`."""
    t0 = time.perf_counter()
    texts = list(texts) if texts is not None else sample_texts(session, sample, seed=seed)
    if not texts or any(not isinstance(t, str) for t in texts):
        raise InvalidArgument("texts must be a non-empty list of strings (or None to sample from the model)")
    held_texts = texts[-max(1, len(texts) // 10):] if len(texts) > 1 else texts
    train_texts = texts[:-len(held_texts)] if len(texts) > 1 else texts
    acts = collect(session, train_texts, site, max_tokens, context)
    held = collect(session, held_texts, site, max(256, max_tokens // 10), context)
    width = acts.shape[1]
    sae = fit(acts, d_sae or 4 * width, architecture, k, l1, steps, batch, seed=seed, progress=progress, site=site)
    sae.cfg["metadata"]["model_name"] = session.model_id
    sae.to(session.device)
    l0, fve, dead = held_out_metrics(sae, held)
    from labkit.features.reading import splice_report

    splice = splice_report(session, held_texts[:8], sae).as_dict()
    report = TrainReport(architecture=architecture, d_in=width, d_sae=sae.d_sae, tokens=len(acts), steps=steps,
                         seconds=round(time.perf_counter() - t0, 1), l0=l0, fraction_of_variance_explained=fve,
                         dead_fraction=dead, splice=splice)
    sae.cfg["training_report"] = report.as_dict()
    if save is not None:
        sae.save(save)
    return sae, report
