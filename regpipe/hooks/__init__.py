"""Model-side hooks: apply a pipeline's per-batch plan inside any ``nn.Module``, read its activations and
build the losses that need them (PatchUp, the invariance and saliency-consistency losses, SIGN's
feature function); the formulas are in the docstrings of the functions that implement them."""

from regpipe.hooks.features import check_features, tapped_features
from regpipe.hooks.invariance import InvarianceLoss
from regpipe.hooks.patchup import PatchUpHook
from regpipe.hooks.saliency import ConsistencyObjective, SaliencyLoss
from regpipe.hooks.tap import FeatureTap, find_module, unwrap_model

__all__ = ["ConsistencyObjective", "FeatureTap", "InvarianceLoss", "PatchUpHook", "SaliencyLoss", "check_features",
           "find_module", "tapped_features", "unwrap_model"]
