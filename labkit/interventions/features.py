"""Feature interventions: steer along an SAE feature's decoder direction, ablate a feature, clamp it to a value.

Each is an activation intervention at the SAE's site (a transcoder: read at its input site, written at its output
site) that adds ``decode(f') − decode(f)`` to the site's value, f the features of that value and f' the edited
ones: the SAE's reconstruction error stays in the model, so an edit that changes nothing leaves the model's output
exactly as it was, and ablating feature i subtracts exactly f_i · W_dec[i] (in the site's units)."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import torch

from labkit.core.errors import InvalidArgument, check_int
from labkit.features.reading import flat
from labkit.features.sae import SAE, as_sae
from labkit.interventions.base import ActivationIntervention
from labkit.model.hooks import sites_of


class _FeatureEdit(ActivationIntervention):
    """An edit of one SAE feature (f → f') at the positions given (all by default)."""

    def __init__(self, sae: SAE | str, feature: int, positions: int | Sequence[int] | None = None) -> None:
        if isinstance(feature, bool) or not isinstance(feature, int):
            raise InvalidArgument(f"feature must be an integer feature index; got {feature!r}")
        self.sae, self.feature = sae, feature
        self.positions = None if positions is None else ([positions] if isinstance(positions, int) else
                                                         list(positions))

    def bind(self, session: Any) -> None:
        self.sae = as_sae(self.sae, session)
        check_int("feature", self.feature, 0, self.sae.d_sae - 1)

    @abc.abstractmethod
    def _edit(self, f: torch.Tensor) -> torch.Tensor:
        """The edited features (..., d_sae) (edited in place on the copy given)."""

    def attach(self, model: Any) -> list[Any]:
        sae, held = self.sae, {}
        wanted = None if self.positions is None else torch.tensor(self.positions)

        def delta_of(value: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            x = flat(value, sae.site).to(sae.W_enc.device)
            delta = sae.edit_delta(x, self._edit)  # (B, t, d_out)
            if wanted is not None:
                delta = delta * torch.isin(positions, wanted).to(delta.device)[None, :, None]
            return delta

        def add(value: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
            shaped = delta.reshape(value.shape) if delta.numel() == value.numel() else delta
            return value + shaped.to(value.device, value.dtype)

        sites = sites_of(model)
        if not sae.is_transcoder:
            return sites.hook(sae.site, lambda value, positions: add(value, delta_of(value, positions)))

        def read(value: torch.Tensor, positions: torch.Tensor) -> None:
            held["delta"] = delta_of(value, positions)

        def write(value: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return add(value, held.pop("delta"))

        return [*sites.hook(sae.site, read), *sites.hook(sae.site_out, write)]


class SteerFeature(_FeatureEdit):
    """Add ``scale`` to feature ``feature``'s activation: the site moves by scale · W_dec[feature] (its decoder
    direction, in the site's units) at every position (or those given)."""

    def __init__(self, sae: SAE | str, feature: int, scale: float,
                 positions: int | Sequence[int] | None = None) -> None:
        super().__init__(sae, feature, positions)
        self.scale = _finite("scale", scale)

    def _edit(self, f: torch.Tensor) -> torch.Tensor:
        f[..., self.feature] += self.scale
        return f

    def __repr__(self) -> str:
        return f"SteerFeature({_name(self.sae)}, feature={self.feature}, scale={self.scale:g})"


class AblateFeature(_FeatureEdit):
    """Set feature ``feature`` to 0: the site loses f_i · W_dec[feature] wherever the feature was active."""

    def _edit(self, f: torch.Tensor) -> torch.Tensor:
        f[..., self.feature] = 0.0
        return f

    def __repr__(self) -> str:
        return f"AblateFeature({_name(self.sae)}, feature={self.feature})"


class ClampFeature(_FeatureEdit):
    """Set feature ``feature`` to ``value`` at every position (or those given), active or not."""

    def __init__(self, sae: SAE | str, feature: int, value: float,
                 positions: int | Sequence[int] | None = None) -> None:
        super().__init__(sae, feature, positions)
        self.value = _finite("value", value)

    def _edit(self, f: torch.Tensor) -> torch.Tensor:
        f[..., self.feature] = self.value
        return f

    def __repr__(self) -> str:
        return f"ClampFeature({_name(self.sae)}, feature={self.feature}, value={self.value:g})"


def _finite(name: str, value: Any) -> float:
    """``value`` as a float, or InvalidArgument naming ``name`` when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not torch.isfinite(torch.tensor(value)):
        raise InvalidArgument(f"{name} must be a finite number; got {value!r}")
    return float(value)


def _name(sae: Any) -> str:
    return repr(sae.name if isinstance(sae, SAE) else str(sae))


FEATURE_EDITS: dict[str, Callable[..., _FeatureEdit]] = {"steer": SteerFeature, "ablate": AblateFeature,
                                                          "clamp": ClampFeature}
"""The feature interventions by name (the Lab's buttons and the CLI use these)."""
