"""Ops: classes that draw their parameters from their own generator and call a pure function on a
:class:`Batch` (the op contract of :mod:`regpipe.core.op`)."""

from regpipe.core.mix_plan import MixPlan
from regpipe.core.patchup_plan import PatchUpPlan
from regpipe.ops.augment import (
    Augment,
    RandomAffine,
    RandomBrightnessContrast,
    RandomFlip,
    RandomPadCrop,
    RandomResizedCrop,
    Replicate,
)
from regpipe.ops.patchup import PatchUp
from regpipe.ops.sign import SignAugment, SignPlan
from regpipe.ops.sum_mix import GradualSumMix, RowMixOp, SumMix, mix_batch
from regpipe.ops.tta import TestTimeSumAugmentation, TTAParams, draw_partners

__all__ = ["Augment", "RandomAffine", "RandomBrightnessContrast", "RandomFlip", "RandomPadCrop", "RandomResizedCrop",
           "Replicate", "GradualSumMix", "MixPlan", "PatchUp", "PatchUpPlan", "SignAugment", "SignPlan", "SumMix",
           "RowMixOp", "TTAParams", "TestTimeSumAugmentation", "draw_partners", "mix_batch"]
