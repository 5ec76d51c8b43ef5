"""Model-side hooks: apply a pipeline's per-batch plan inside any ``nn.Module`` and read its activations
(SPEC.md sections 2-5)."""

from regpipe.hooks.patchup import PatchUpHook
from regpipe.hooks.tap import FeatureTap, find_module, unwrap_model

__all__ = ["FeatureTap", "PatchUpHook", "find_module", "unwrap_model"]
