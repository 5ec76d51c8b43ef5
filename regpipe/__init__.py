"""regpipe: batch-level regularizers for fast image data loaders.

The public API: the :class:`Batch` data model, the ops (classes that sample parameters and call a pure
function), the :mod:`regpipe.functional` pure functions, the :class:`Cascade` controller, and the
loader adapters in :mod:`regpipe.loaders`.

The names below are imported when first used (PEP 562), so ``import regpipe`` alone loads neither torch nor
numba: the ``regpipe`` command (:func:`regpipe.cli.main`) sets the OpenMP settings torch reads when it loads.
"""

import importlib
from importlib.metadata import version as _version
from typing import Any

#: the installed distribution's version (pyproject.toml is its one source)
__version__ = _version("regpipe")

#: public name -> the module that defines it
_EXPORTS = {
    "Augment": "regpipe.ops",
    "Batch": "regpipe.core.batch",
    "BatchOp": "regpipe.core.op",
    "BoxRecord": "regpipe.core.batch",
    "Cascade": "regpipe.engine.cascade",
    "CascadeEvent": "regpipe.engine.cascade",
    "ConsistencyObjective": "regpipe.hooks",
    "CutMix": "regpipe.ops.cutmix",
    "CutOut": "regpipe.ops.cutmix",
    "FeatureTap": "regpipe.hooks",
    "GradualSumMix": "regpipe.ops",
    "InvarianceLoss": "regpipe.hooks",
    "LossDeltaOrderer": "regpipe.sampler",
    "LossOrderer": "regpipe.sampler",
    "LossSampler": "regpipe.sampler",
    "MixPlan": "regpipe.core.mix_plan",
    "MixRecord": "regpipe.core.batch",
    "MixUp": "regpipe.ops.cutmix",
    "PatchUp": "regpipe.ops",
    "PatchUpHook": "regpipe.hooks",
    "PatchUpPlan": "regpipe.ops",
    "Replicate": "regpipe.ops",
    "SaliencyLoss": "regpipe.hooks",
    "SignAugment": "regpipe.ops",
    "SumMix": "regpipe.ops",
    "TestTimeSumAugmentation": "regpipe.ops",
    "identity_affine": "regpipe.core.batch",
    "labels_to_targets": "regpipe.core.batch",
    "mix_batch": "regpipe.ops",
}
#: the sub-packages, reachable as attributes after ``import regpipe``
_PACKAGES = ("cli", "core", "engine", "functional", "hooks", "integrations", "kernels", "loaders", "ops", "sampler")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _PACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_PACKAGES})
