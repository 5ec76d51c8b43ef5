"""Scoring samplers: the Perfect Ordering Approximation (Simionescu, "Deep Learning Training Procedure
Augmentations", 2020, chapter 2).

* :class:`LossDeltaOrderer` (section 2.4.2): batches reordered by the loss drop of one trial optimizer
  step; the winner's computed step is committed, rollback is exact (:class:`StateSnapshot`).
* :class:`LossOrderer` / :class:`LossSampler` (section 2.4.1): index batch samplers for a DataLoader
  that order, or draw, samples by their current loss.

The formulas are in the module docstrings of :mod:`regpipe.sampler.loss_delta` and
:mod:`regpipe.sampler.loss_order`.
"""

from regpipe.sampler.loss_delta import DeltaStep, LossDeltaOrderer, draw_external
from regpipe.sampler.loss_order import LossOrderer, LossSampler, PlainBatch, per_sample_cross_entropy, sample_losses
from regpipe.sampler.snapshot import StateSnapshot, frozen_running_stats, tracked_parameters

__all__ = [
    "DeltaStep",
    "LossDeltaOrderer",
    "LossOrderer",
    "LossSampler",
    "PlainBatch",
    "StateSnapshot",
    "draw_external",
    "frozen_running_stats",
    "per_sample_cross_entropy",
    "sample_losses",
    "tracked_parameters",
]
