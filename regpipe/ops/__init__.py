"""Ops: classes that sample parameters from a generator and call a pure function on a :class:`Batch`."""

from regpipe.ops.augment import (
    Augment,
    RandomAffine,
    RandomBrightnessContrast,
    RandomFlip,
    RandomResizedCrop,
    Replicate,
)
from regpipe.ops.patchup import PatchUp, PatchUpPlan
from regpipe.ops.sign import SignAugment, SignPlan
from regpipe.ops.sum_mix import GradualSumMix, SumMix, mix_batch
from regpipe.ops.tta import TestTimeSumAugmentation, draw_partners

__all__ = ["Augment", "RandomAffine", "RandomBrightnessContrast", "RandomFlip", "RandomResizedCrop", "Replicate",
           "GradualSumMix", "PatchUp", "PatchUpPlan", "SignAugment", "SignPlan", "SumMix", "TestTimeSumAugmentation", "draw_partners", "mix_batch"]
