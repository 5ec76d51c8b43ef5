"""regpipe: batch-level regularizers for fast image data loaders.

The public API: the :class:`Batch` data model, the ops (classes that sample parameters and call a pure
function), the :mod:`regpipe.functional` pure functions, the :class:`Cascade` controller, and the
loader adapters in :mod:`regpipe.loaders`.
"""

from importlib.metadata import version as _version

from regpipe.core.batch import Batch, BoxRecord, MixRecord, identity_affine, labels_to_targets
from regpipe.core.mix_plan import MixPlan
from regpipe.core.op import BatchOp
from regpipe.engine.cascade import Cascade, CascadeEvent
from regpipe.hooks import ConsistencyObjective, FeatureTap, InvarianceLoss, PatchUpHook, SaliencyLoss
from regpipe.ops import (
    Augment,
    GradualSumMix,
    PatchUp,
    PatchUpPlan,
    Replicate,
    SignAugment,
    SumMix,
    TestTimeSumAugmentation,
    mix_batch,
)
from regpipe.ops.cutmix import CutMix, CutOut, MixUp
from regpipe.sampler import LossDeltaOrderer, LossOrderer, LossSampler

#: the installed distribution's version (pyproject.toml is its one source)
__version__ = _version("regpipe")

__all__ = [
    "Augment",
    "Batch",
    "BatchOp",
    "BoxRecord",
    "Cascade",
    "CascadeEvent",
    "ConsistencyObjective",
    "CutMix",
    "CutOut",
    "FeatureTap",
    "GradualSumMix",
    "InvarianceLoss",
    "LossDeltaOrderer",
    "LossOrderer",
    "LossSampler",
    "MixPlan",
    "MixRecord",
    "MixUp",
    "PatchUp",
    "PatchUpHook",
    "PatchUpPlan",
    "Replicate",
    "SaliencyLoss",
    "SignAugment",
    "SumMix",
    "TestTimeSumAugmentation",
    "identity_affine",
    "labels_to_targets",
    "mix_batch",
]
