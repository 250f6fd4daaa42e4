"""Features: sparse autoencoders (SAEs) and transcoders over a model's hook sites — loaded in SAELens' format, read
on prompts and generations, used as interventions, and trained offline (:mod:`labkit.features.sae`,
:mod:`labkit.features.reading`, :mod:`labkit.features.train`; the interventions are in
:mod:`labkit.interventions.features`)."""

from labkit.features.reading import Features, SpliceReport, splice_report
from labkit.features.sae import SAE, load_sae
from labkit.features.train import TrainReport, train_sae

__all__ = ["SAE", "Features", "SpliceReport", "TrainReport", "load_sae", "splice_report", "train_sae"]
