"""Reading an SAE's features on a model: per position of a prompt (:func:`features`), per generated token (the
``capture=[sae]`` of ``generate``), and how much of the model the SAE explains (:func:`splice_report`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from labkit.core.errors import InvalidArgument, check_int
from labkit.features.sae import SAE


def flat(value: torch.Tensor, site: str) -> torch.Tensor:
    """A site's value as the vectors an SAE reads: ``attn.z`` (..., H, d_head) flattened to (..., H·d_head)."""
    return value.flatten(-2) if site.endswith("attn.z") else value


@dataclass
class Features:
    """An SAE's features on one prompt. The first position (an attention sink whose norm is an outlier, left out
    of training as the field does) gets activations that mean little: read from position 1."""

    acts: torch.Tensor
    """Shape (T, d_sae): each position's feature activations (float32, on the CPU; most are 0)."""
    tokens: list[str]
    sae: str
    """The SAE's name."""
    reconstruction_error: torch.Tensor
    """Shape (T,): ‖x − x̂‖² / ‖x‖² at each position (0: reconstructed exactly)."""

    def top(self, k: int = 5) -> Any:
        """A DataFrame with the ``k`` most active features of each position: position, token, rank, feature,
        activation (features that are 0 left out)."""
        import pandas as pd

        check_int("k", k, 1, self.acts.shape[1])
        values, ids = self.acts.topk(k, dim=-1)
        rows = [{"position": p, "token": self.tokens[p], "rank": r + 1, "feature": int(ids[p, r]),
                 "activation": float(values[p, r])}
                for p in range(len(self.tokens)) for r in range(k) if values[p, r] > 0]
        return pd.DataFrame(rows, columns=["position", "token", "rank", "feature", "activation"])

    def to_pandas(self) -> Any:
        """One row per position: position, token, L0 (active features), the top feature and its activation, the
        reconstruction error."""
        import pandas as pd

        values, ids = self.acts.max(-1)
        return pd.DataFrame({"position": range(len(self.tokens)), "token": self.tokens,
                             "l0": (self.acts > 0).sum(-1).tolist(), "top_feature": ids.tolist(),
                             "top_activation": values.tolist(),
                             "reconstruction_error": self.reconstruction_error.tolist()})

    def where(self, feature: int) -> torch.Tensor:
        """Shape (T,): feature ``feature``'s activation at every position."""
        check_int("feature", feature, 0, self.acts.shape[1] - 1)
        return self.acts[:, feature]

    def image(self, features: Sequence[int] | None = None, n: int = 12, first: bool = False) -> Any:
        """Tokens × features heatmap of the activations: ``features`` (default: the ``n`` with the largest total
        activation), colour bar in activation units. The sequence's first position is left out unless ``first``:
        SAEs are trained without it (its norm is an outlier) and its activations would swamp the colour scale."""
        from labkit.records.figures import heatmap

        start = 0 if first or len(self.tokens) == 1 else 1
        acts = self.acts[start:]
        chosen = list(features) if features is not None else acts.sum(0).topk(min(n, acts.shape[1])).indices.tolist()
        for f in chosen:
            check_int("features[i]", f, 0, self.acts.shape[1] - 1)
        return heatmap(acts[:, chosen], x_labels=list(chosen), y_labels=self.tokens[start:],
                       xlabel="feature", ylabel="token", colorbar="feature activation", tokens=True,
                       title=f"{self.sae}: features over the prompt")


def top_features(sae: SAE, vector: torch.Tensor, k: int = 10) -> dict[str, list[Any]]:
    """The ``k`` most active features of one site vector (the capture of a generated token):
    ``{"features": ids, "activations": values}``, zeros left out."""
    f = sae.encode(flat(vector, sae.site).to(sae.W_enc.device).float())
    values, ids = f.topk(min(k, sae.d_sae))
    keep = values > 0
    return {"features": ids[keep].tolist(), "activations": values[keep].tolist()}


def features(sites: Any, ids: torch.Tensor, sae: SAE, tokens: list[str]) -> Features:
    """Feature activations of ``sae`` at every position of ``ids`` (1, T) (a transcoder's: from its input site), with
    the reconstruction error of each position: one forward pass (the caller holds the model and checks the memory;
    ``Session.features`` does both)."""
    names = [sae.site] if not sae.is_transcoder else [sae.site, sae.site_out]
    with torch.inference_mode(), sites.read(names) as seen:
        sites.model(input_ids=ids, logits_to_keep=1)
    x = flat(seen[sae.site][0][0], sae.site).float()
    target = x if not sae.is_transcoder else flat(seen[sae.site_out][0][0], sae.site_out).float()
    with torch.no_grad():
        recon, f = sae.reconstruct(x.to(sae.W_enc.device))
        target = target.to(recon.device)
        error = ((target - recon) ** 2).sum(-1) / (target ** 2).sum(-1).clamp_min(1e-12)
    return Features(acts=f.cpu(), tokens=tokens, sae=sae.name, reconstruction_error=error.cpu())


@contextlib.contextmanager
def spliced(sites: Any, sae: SAE, error_term: bool = False) -> Iterator[dict[str, list[float]]]:
    """Inside the block every forward pass runs with the SAE spliced in: the value at its output site (its own site
    for an SAE) replaced by the reconstruction (``error_term``: plus the error, i.e. unchanged) at every position
    but the sequence's first (an attention sink whose norm is an outlier: left as it is, as SAEs are trained and
    evaluated in the field); yields per-pass sums over the replaced positions: {"l0", "sq_error", "sq_norm",
    "sq_centred", "n"}."""
    stats: dict[str, list[float]] = {"l0": [], "sq_error": [], "sq_norm": [], "sq_centred": [], "n": []}
    held: dict[str, torch.Tensor] = {}

    def read_in(value: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        recon, f = sae.reconstruct(flat(value, sae.site).to(sae.W_enc.device))
        held["recon"], held["l0"] = recon, (f > 0).float().sum(-1)
        if sae.is_transcoder:
            return None
        return write(value, positions)

    def write(value: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = flat(value, sae.site_out or sae.site).float()
        recon = held["recon"].to(x.device)
        keep = (positions != 0).to(x.device)  # (t,): the first position stays as it is
        xs, rs = x[:, keep], recon[:, keep]
        stats["l0"].append(float(held["l0"][:, keep.to(held["l0"].device)].sum()))
        stats["sq_error"].append(float(((xs - rs) ** 2).sum()))
        stats["sq_norm"].append(float((xs ** 2).sum()))
        stats["sq_centred"].append(float(((xs - xs.mean(-2, keepdim=True)) ** 2).sum()) if xs.shape[1] else 0.0)
        stats["n"].append(float(xs.shape[0] * xs.shape[1]))
        out = x if error_term else torch.where(keep[None, :, None], recon, x)
        return out.reshape(value.shape).to(value.dtype)

    edits = {sae.site: read_in}
    if sae.is_transcoder:
        edits[sae.site_out] = write
    with sites.edit(edits):
        yield stats


def _zero_after_first(value: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The site's value zeroed at every position but the sequence's first (the splice's baseline)."""
    return torch.where((positions == 0).to(value.device).reshape(1, -1, *[1] * (value.ndim - 2)), value, 0.0)


@dataclass(frozen=True)
class SpliceReport:
    """How much of the model an SAE explains, over some texts (the field's usual measures)."""

    tokens: int
    l0: float
    """Mean number of active features per token."""
    fraction_of_variance_explained: float
    """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ each text's mean vector)."""
    kl_bits: float
    """Mean KL(model ‖ model with the SAE spliced in) per next-token prediction, in bits."""
    loss_nats: float
    """The model's mean next-token cross-entropy (nats)."""
    spliced_loss_nats: float
    """The same with the SAE's reconstruction in place of the site's value."""
    zero_loss_nats: float
    """The same with the site's value replaced by zeros (at the same positions: all but the first)."""

    @property
    def loss_recovered(self) -> float:
        """(zero − spliced) / (zero − model): 1 when the SAE loses nothing, 0 when it is as bad as zeros."""
        gap = self.zero_loss_nats - self.loss_nats
        return (self.zero_loss_nats - self.spliced_loss_nats) / gap if gap else math.nan

    def as_dict(self) -> dict[str, float]:
        """The measures, and loss_recovered."""
        return {**{k: getattr(self, k) for k in ("tokens", "l0", "fraction_of_variance_explained", "kl_bits",
                                                  "loss_nats", "spliced_loss_nats", "zero_loss_nats")},
                "loss_recovered": self.loss_recovered}


def splice_report(session: Any, texts: Sequence[str], sae: SAE) -> SpliceReport:
    """:class:`SpliceReport` of ``sae`` over ``texts``: one forward pass per text as it is, with the SAE spliced in,
    and with the site zeroed."""
    from labkit.measures.information import kl_divergence

    if isinstance(texts, str) or not texts:
        raise InvalidArgument("texts must be a non-empty list of strings")
    sae.check(session)
    sites = session.sites
    losses = {"model": [], "spliced": [], "zero": []}
    kls, totals, n_pred = [], {"l0": 0.0, "sq_error": 0.0, "sq_centred": 0.0, "n": 0.0}, 0
    out_site = sae.site_out or sae.site
    with session.exclusive(), torch.inference_mode():
        for text in texts:
            ids = session.encode(text)
            if ids.shape[1] < 2:
                continue
            target, n_pred = ids[0, 1:], n_pred + ids.shape[1] - 1

            def logits_now(ids: torch.Tensor = ids) -> torch.Tensor:
                return session.model(input_ids=ids).logits[0, :-1].float()

            base = logits_now()
            with spliced(sites, sae) as stats:
                spliced_logits = logits_now()
            with sites.edit({out_site: _zero_after_first}):
                zero = logits_now()
            for name, logits in (("model", base), ("spliced", spliced_logits), ("zero", zero)):
                losses[name].append(torch.nn.functional.cross_entropy(logits, target.to(logits.device),
                                                                      reduction="sum").item())
            kls.append(float(kl_divergence(base, spliced_logits, "bits").sum()))
            for key in totals:
                totals[key] += sum(stats[key])
    if n_pred == 0:
        raise InvalidArgument("texts must hold at least one text of 2 tokens or more")
    return SpliceReport(tokens=int(totals["n"]), l0=totals["l0"] / totals["n"],
                        fraction_of_variance_explained=1.0 - totals["sq_error"] / max(totals["sq_centred"], 1e-12),
                        kl_bits=sum(kls) / n_pred, loss_nats=sum(losses["model"]) / n_pred,
                        spliced_loss_nats=sum(losses["spliced"]) / n_pred, zero_loss_nats=sum(losses["zero"]) / n_pred)
