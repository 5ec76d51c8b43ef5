"""Model-side hooks: apply a pipeline's per-batch plan inside any ``nn.Module`` (SPEC.md section 2)."""

from regpipe.hooks.patchup import PatchUpHook, unwrap_model

__all__ = ["PatchUpHook", "unwrap_model"]
