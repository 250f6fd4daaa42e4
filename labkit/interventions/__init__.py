"""Interventions: token-level (on each step's logits) and activation-level (forward hooks), scoped and
composable, with their effects measured. See :mod:`labkit.interventions.base` for how they apply."""

from labkit.interventions.activation import (
    AblateHead,
    ActivationHook,
    Patch,
    PatchingSweep,
    Steer,
    head_importance,
    patching_sweep,
    residual,
    steering_vector,
)
from labkit.interventions.base import (
    ActivationIntervention,
    Intervention,
    InterventionContext,
    TokenIntervention,
)
from labkit.interventions.effects import Effect, analyze_intervention_effects, evaluate
from labkit.interventions.image import AblatePatches
from labkit.interventions.recipes import RECIPES, recipe
from labkit.interventions.token import (
    Boost,
    Conditional,
    Custom,
    EntropyMaximize,
    EntropyTarget,
    ForceTokens,
    Suppress,
    temperature_for_entropy,
)

__all__ = [
    "RECIPES",
    "AblateHead",
    "AblatePatches",
    "ActivationHook",
    "ActivationIntervention",
    "Boost",
    "Conditional",
    "Custom",
    "Effect",
    "EntropyMaximize",
    "EntropyTarget",
    "ForceTokens",
    "Intervention",
    "InterventionContext",
    "Patch",
    "PatchingSweep",
    "Steer",
    "Suppress",
    "TokenIntervention",
    "analyze_intervention_effects",
    "evaluate",
    "head_importance",
    "patching_sweep",
    "recipe",
    "residual",
    "steering_vector",
    "temperature_for_entropy",
]
