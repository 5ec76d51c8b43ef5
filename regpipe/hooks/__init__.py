"""Model-side hooks: apply a pipeline's per-batch plan inside any ``nn.Module``, read its activations and
build the losses that need them (SPEC.md sections 2-5)."""

from regpipe.hooks.invariance import InvarianceLoss
from regpipe.hooks.patchup import PatchUpHook
from regpipe.hooks.saliency import ConsistencyObjective, SaliencyLoss
from regpipe.hooks.tap import FeatureTap, find_module, unwrap_model

__all__ = ["ConsistencyObjective", "FeatureTap", "InvarianceLoss", "PatchUpHook", "SaliencyLoss", "find_module",
           "unwrap_model"]
