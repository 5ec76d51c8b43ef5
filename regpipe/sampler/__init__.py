"""Scoring samplers: the Perfect Ordering Approximation of SPEC section 6.

* :class:`LossDeltaOrderer` (SPEC 6.2): batches reordered by the loss drop of one trial optimizer
  step; the winner's computed step is committed, rollback is exact (:class:`StateSnapshot`).
* :class:`LossOrderer` / :class:`LossSampler` (SPEC 6.1): index batch samplers for a DataLoader that
  order, or draw, samples by their current loss.
"""

from regpipe.sampler.loss_delta import DeltaStep, LossDeltaOrderer, draw_external
from regpipe.sampler.loss_order import LossOrderer, LossSampler, per_sample_cross_entropy, sample_losses
from regpipe.sampler.snapshot import StateSnapshot, frozen_running_stats, tracked_parameters

__all__ = [
    "DeltaStep",
    "LossDeltaOrderer",
    "LossOrderer",
    "LossSampler",
    "StateSnapshot",
    "draw_external",
    "frozen_running_stats",
    "per_sample_cross_entropy",
    "sample_losses",
    "tracked_parameters",
]
