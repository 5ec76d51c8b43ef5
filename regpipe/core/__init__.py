"""Layer 0: the data model every other layer shares.

:class:`Batch` (and its :class:`MixRecord`), the plans ops hand to hooks, explicit per-op randomness,
and the op contract. Nothing here imports from any other regpipe layer.
"""

from regpipe.core.batch import Batch, MixRecord, identity_affine, labels_to_targets
from regpipe.core.mix_plan import MixPlan
from regpipe.core.op import BatchOp, Op
from regpipe.core.patchup_plan import PatchUpPlan
from regpipe.core.rng import DeviceGenerator, rank_seed
from regpipe.core.sign_plan import SignPlan

__all__ = ["Batch", "BatchOp", "DeviceGenerator", "MixPlan", "Op", "PatchUpPlan", "SignPlan", "rank_seed", "MixRecord", "identity_affine", "labels_to_targets"]
