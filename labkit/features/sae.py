"""A sparse autoencoder (or transcoder) over one hook site, in SAELens' on-disk format.

SAELens itself does not install beside transformers 5 (it pins TransformerLens < 4), so its format is read and
written here: a folder with ``cfg.json`` and ``sae_weights.safetensors`` holding ``W_enc`` (d_in, d_sae), ``b_enc``
(d_sae), ``W_dec`` (d_sae, d_out), ``b_dec`` (d_out), plus ``threshold`` (JumpReLU) or ``b_gate``, ``r_mag``,
``b_mag`` (gated). The encoder follows SAELens' inference classes:

- input: ``x`` in float32, normalised as ``normalize_activations`` says ("none" and "expected_average_only_in": as
  is, the scale folded into the weights; "constant_norm_rescale": x·√d_in/‖x‖; "layer_norm": (x − μ)/(σ + 1e-5),
  σ the unbiased standard deviation), minus ``b_dec`` when ``apply_b_dec_to_input`` (not for transcoders);
- pre-activations ``h = x̃ W_enc + b_enc``; standard: ReLU(h); JumpReLU: ReLU(h)·[h > threshold]; TopK: the k largest
  of h, ReLU'd, the rest 0; gated: [x̃ W_enc + b_gate > 0] · ReLU(x̃ (W_enc ⊙ exp(r_mag)) + b_mag);
- output: ``f W_dec + b_dec``, the normalisation undone.

Hook names in TransformerLens' spelling (``blocks.8.hook_resid_pre``, ``blocks.3.hook_mlp_out``,
``blocks.2.attn.hook_z``, ``blocks.5.ln2.hook_normalized`` — a transcoder's MLP input) map to labkit's site names;
labkit's own names are accepted as they are. :func:`load_sae` checks the SAE against a Session (width, site, layer)
and refuses what does not fit with one error.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from labkit.core.errors import InvalidArgument
from labkit.core.files import atomic_path

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "jumprelu", "topk", "gated")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
_TL_SITES = [  # TransformerLens hook name -> labkit site name
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), "blocks.{}.resid_pre"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "blocks.{}.resid_post"),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), "blocks.{}.attn_out"),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "blocks.{}.mlp_out"),
    (re.compile(r"^blocks\.(\d+)\.attn\.hook_z$"), "blocks.{}.attn.z"),
    (re.compile(r"^blocks\.(\d+)\.(?:ln2\.hook_normalized|hook_mlp_in|mlp\.hook_in)$"), "blocks.{}.mlp_in"),
    (re.compile(r"^hook_embed$"), "embed"),
    (re.compile(r"^ln_final\.hook_normalized$"), "final_norm"),
]


def site_of(hook_name: str) -> str:
    """labkit's site name for a SAELens / TransformerLens ``hook_name`` (labkit names pass through);
    InvalidArgument for a hook labkit has no site for (e.g. ``hook_resid_mid``)."""
    for pattern, site in _TL_SITES:
        m = pattern.match(hook_name)
        if m:
            return site.format(*m.groups())
    if re.match(r"^(embed|final_norm|blocks\.\d+\.(resid_pre|resid_post|attn_out|mlp_out|mlp_in|attn\.z))$",
                hook_name):
        return hook_name
    raise InvalidArgument(f"the SAE's hook {hook_name!r} has no labkit site: labkit reads resid_pre, resid_post, "
                          "attn_out, mlp_out, mlp_in (a transcoder's MLP input), attn.z, embed and final_norm "
                          "(TransformerLens spellings such as 'blocks.8.hook_resid_pre' are mapped)")


@dataclass
class SAE:
    """A sparse autoencoder over ``site`` (or a transcoder from ``site`` to ``site_out``). Tensors float32 on the CPU
    until :meth:`to`; shapes in the module docstring."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    site: str
    """labkit site name the SAE reads (its encoder input)."""
    architecture: str = "standard"
    site_out: str | None = None
    """A transcoder's output site (it predicts that site's value from ``site``'s); None for an SAE."""
    k: int | None = None
    """TopK: features kept per position."""
    threshold: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    r_mag: torch.Tensor | None = None
    b_mag: torch.Tensor | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    name: str = "sae"
    """Shown in captures and figures: the folder name when loaded."""
    cfg: dict[str, Any] = field(default_factory=dict)
    """The config as read (kept and written back on save)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InvalidArgument(f"architecture must be one of {ARCHITECTURES}; got {self.architecture!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise InvalidArgument(f"normalize_activations must be one of {NORMALIZATIONS}; got "
                                  f"{self.normalize_activations!r}")
        d_in, d_sae = self.W_enc.shape
        want = {"b_enc": (d_sae,), "W_dec": (d_sae, self.W_dec.shape[-1]), "b_dec": (self.W_dec.shape[-1],)}
        if self.architecture == "jumprelu":
            want["threshold"] = (d_sae,)
        if self.architecture == "gated":
            want.update(b_gate=(d_sae,), r_mag=(d_sae,), b_mag=(d_sae,))
        for name, shape in want.items():
            value = getattr(self, name)
            if value is None or tuple(value.shape) != shape:
                got = None if value is None else tuple(value.shape)
                raise InvalidArgument(f"SAE {self.name!r}: {name} must have shape {shape} (W_enc is {(d_in, d_sae)}); "
                                      f"got {got}")
        if self.architecture == "topk" and (not isinstance(self.k, int) or not 1 <= self.k <= d_sae):
            raise InvalidArgument(f"SAE {self.name!r}: a TopK SAE needs k in [1, {d_sae}]; got {self.k!r}")
        if self.is_transcoder:
            self.apply_b_dec_to_input = False  # b_dec lives in the output space

    @property
    def d_in(self) -> int:
        """Width of the vectors read (the site's)."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        """Width of the reconstruction (the output site's for a transcoder)."""
        return int(self.W_dec.shape[1])

    @property
    def is_transcoder(self) -> bool:
        """Whether it predicts another site (``site_out``) rather than reconstructing its own."""
        return self.site_out is not None

    def __repr__(self) -> str:
        to = f" -> {self.site_out!r}" if self.is_transcoder else ""
        return (f"SAE({self.name!r}: {self.architecture}, {self.site!r}{to}, d_in={self.d_in}, d_sae={self.d_sae}"
                f"{f', k={self.k}' if self.k else ''})")

    def to(self, device: Any) -> SAE:
        """The same SAE with its tensors on ``device`` (float32 kept)."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "r_mag", "b_mag"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    # -- the maps ---------------------------------------------------------------------------------------------
    def _normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """x (..., d_in) float32 -> (normalised x, what undoes it)."""
        if self.normalize_activations == "constant_norm_rescale":
            coeff = math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True)
            return x * coeff, ("scale", coeff)
        if self.normalize_activations == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return (x - mu) / (std + 1e-5), ("ln", mu, std)
        return x, None

    def _undo(self, y: torch.Tensor, undo: Any, affine: bool = True) -> torch.Tensor:
        """The normalisation undone on ``y`` (an output, or with ``affine=False`` a difference of outputs)."""
        if undo is None or self.is_transcoder:
            return y
        if undo[0] == "scale":
            return y / undo[1]
        return y * undo[2] + (undo[1] if affine else 0.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations (..., d_sae), float32, of site values ``x`` (..., d_in)."""
        f, _ = self._encode(x)
        return f

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if x.shape[-1] != self.d_in:
            raise InvalidArgument(f"SAE {self.name!r} reads vectors of width {self.d_in}; the site gives {x.shape[-1]}")
        x, undo = self._normalise(x.float())
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        h = x @ self.W_enc + self.b_enc
        if self.architecture == "standard":
            f = torch.relu(h)
        elif self.architecture == "jumprelu":
            f = torch.relu(h) * (h > self.threshold)
        elif self.architecture == "topk":
            top = h.topk(self.k, dim=-1)
            f = torch.zeros_like(h).scatter(-1, top.indices, torch.relu(top.values))
        else:  # gated
            gate = (x @ self.W_enc + self.b_gate) > 0
            f = gate * torch.relu(x @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        return f, undo

    def decode(self, f: torch.Tensor, undo: Any = None) -> torch.Tensor:
        """The reconstruction (..., d_out) of feature activations ``f``, in the site's units when ``undo`` (from the
        same input) says how it was normalised."""
        return self._undo(f @ self.W_dec + self.b_dec, undo)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction (..., d_out), features (..., d_sae))`` of ``x``."""
        f, undo = self._encode(x)
        return self.decode(f, undo), f

    def edit_delta(self, x: torch.Tensor, edit: Any) -> torch.Tensor:
        """What a feature edit adds to the output site: decode(edit(f)) − decode(f), exactly 0 where ``edit``
        changes nothing (the SAE's error term is kept: the model sees x + delta). ``edit(f) -> f'`` on (..., d_sae)."""
        f, undo = self._encode(x)
        changed = edit(f.clone())
        return self._undo((changed - f) @ self.W_dec, undo, affine=False)

    # -- files ------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` into ``folder`` (SAELens' format, each file atomically);
        returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {n: getattr(self, n).detach().float().cpu().contiguous() for n in
                   ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "r_mag", "b_mag")
                   if getattr(self, n) is not None}
        cfg = {**self.cfg, "architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
               "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
               "normalize_activations": self.normalize_activations}
        cfg.setdefault("metadata", {})
        cfg["metadata"] = {**cfg["metadata"], "hook_name": self.cfg.get("metadata", {}).get("hook_name", self.site)}
        cfg["hook_name"] = cfg["metadata"]["hook_name"]
        if self.k is not None:
            cfg["k"] = self.k
        if self.is_transcoder:
            cfg.update(d_out=self.d_out, hook_name_out=self.site_out)
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        with atomic_path(folder / CFG_FILE) as tmp:
            tmp.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> SAE:
        """An SAE from a SAELens folder (v5 or v6 config; standard, JumpReLU, TopK, gated, transcoders)."""
        from safetensors.torch import load_file

        folder = Path(folder).expanduser()
        if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise InvalidArgument(f"no SAE at {str(folder)!r}: a folder with {CFG_FILE} and {WEIGHTS_FILE} (SAELens' "
                                  "format) is needed")
        cfg = json.loads((folder / CFG_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / WEIGHTS_FILE))
        meta = cfg.get("metadata") or cfg.get("meta") or {}
        hook = meta.get("hook_name") or cfg.get("hook_name")
        if not hook:
            raise InvalidArgument(f"{str(folder / CFG_FILE)!r} names no hook_name: which site the SAE reads is unknown")
        architecture = str(cfg.get("architecture", "standard"))
        out = cfg.get("hook_name_out") or meta.get("hook_name_out")
        if architecture in ("transcoder", "jumprelu_transcoder"):
            architecture = "standard" if architecture == "transcoder" else "jumprelu"
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if cfg.get("activation_fn_str") == "topk" or (architecture == "standard" and k):
            architecture = "topk"
        if architecture not in ARCHITECTURES:
            raise InvalidArgument(f"{str(folder)!r}: architecture {architecture!r} is not one labkit reads "
                                  f"({', '.join(ARCHITECTURES)}, transcoders)")
        if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
            raise InvalidArgument(f"{str(folder)!r}: reshape_activations {cfg['reshape_activations']!r} is not read")
        missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in tensors]
        if missing:
            raise InvalidArgument(f"{str(folder / WEIGHTS_FILE)!r} lacks {missing}")
        extra = {n: tensors[n].float() for n in ("threshold", "b_gate", "r_mag", "b_mag") if n in tensors}
        if architecture == "jumprelu" and "threshold" not in extra and "log_threshold" in tensors:
            extra["threshold"] = tensors["log_threshold"].float().exp()
        return cls(W_enc=tensors["W_enc"].float(), b_enc=tensors["b_enc"].float(), W_dec=tensors["W_dec"].float(),
                   b_dec=tensors["b_dec"].float(), site=site_of(hook), architecture=architecture,
                   site_out=site_of(out) if out else None, k=int(k) if k else None,
                   apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                   normalize_activations=str(cfg.get("normalize_activations", "none")), name=folder.name,
                   cfg=cfg, **extra)

    def check(self, session: Any) -> None:
        """InvalidArgument when this SAE does not fit ``session``'s model: a site it lacks, or a width that is not
        the site's."""
        sites = session.sites
        for which, site, width in (("reads", self.site, self.d_in), ("writes", self.site_out, self.d_out)):
            if site is None:
                continue
            if site not in sites:
                raise InvalidArgument(f"SAE {self.name!r} {which} site {site!r}, which this model does not have "
                                      f"(its blocks are 0..{sites.n_layers - 1})")
            have = sites.n_heads * sites.head_dim if site.endswith("attn.z") else sites.d_model
            if width != have:
                raise InvalidArgument(f"SAE {self.name!r} {which} {site!r} with width {width}; this model's is {have} "
                                      f"(an SAE trained on another model?)")


def load_sae(folder: str | Path, session: Any = None) -> SAE:
    """:meth:`SAE.load`, checked against ``session`` when given (site, width) and moved to its device."""
    sae = SAE.load(folder)
    if session is not None:
        sae.check(session)
        sae.to(session.device)
    return sae


def as_sae(sae: Any, session: Any) -> SAE:
    """``sae`` (an :class:`SAE` or a folder) checked against ``session`` and on its device."""
    if isinstance(sae, (str, Path)):
        return load_sae(sae, session)
    if not isinstance(sae, SAE):
        raise InvalidArgument(f"sae must be a labkit.features.SAE or a folder in SAELens' format; got "
                              f"{type(sae).__name__}")
    sae.check(session)
    return sae.to(session.device)
