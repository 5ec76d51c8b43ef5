"""PatchUp as a training algorithm: a plan drawn in the loader, the mixing inside the model's hidden layers
(:class:`~regpipe.hooks.patchup.PatchUpHook`), and PatchUp's own loss."""

from __future__ import annotations

from typing import Any, Literal

import torch

from regpipe.core.batch import Batch
from regpipe.core.op import Op
from regpipe.engine.algorithms.base import Algorithm, LossFn, Resource, RunContext, Stage
from regpipe.engine.config import PatchUpConfig
from regpipe.hooks.patchup import PatchUpHook
from regpipe.ops.patchup import PatchUp

__all__ = ["PatchUpAlgorithm"]


class PatchUpAlgorithm(Algorithm):
    """``patchup-soft`` / ``patchup-hard`` (Faramarzi et al., 2022), the official CIFAR setting: a layer is
    drawn per batch among the input (0) and ``config.layers`` (1, 2, ...); ``lam ~ Beta(2, 2)``; the loss is
    BCE on the softmax (``config.loss="bce"``). It owns the forward pass (the hook mixes hidden
    features) and needs the loop's own step to take its loss."""

    owns = frozenset({Resource.FORWARD})
    uses = frozenset({Resource.STEP})  # its loss is taken in the loop's own step

    def __init__(self, mode: Literal["soft", "hard"], config: PatchUpConfig) -> None:
        self.name = f"patchup-{mode}"  # type: ignore[misc]  # one class, two recipe words
        self.mode, self.config = mode, config
        self.hook: PatchUpHook | None = None

    def attach(self, run: RunContext) -> None:
        layers = self.config.layers
        self.op = PatchUp(mode=self.mode, candidate_layers=tuple(range(len(layers) + 1)), seed=run.seed)
        self.hook = PatchUpHook(run.model, list(layers))

    def ops(self) -> list[tuple[Stage, Op]]:
        return [(Stage.PLAN, self.op)]

    def forward_loss(self, model: torch.nn.Module, batch: Batch, loss_fn: LossFn) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = self.hook.forward(batch)
        if not torch.isfinite(logits).all():
            # BCE would fail with a bare "input should be between 0 and 1": hand the loop the non-finite
            # value instead, so that it stops naming the epoch and step.
            return logits.sum(), {}
        return self.hook.loss(logits, batch, kind=self.config.loss), {}

    def describe(self) -> dict[str, Any]:
        return {"prob": self.op.patchup_prob}

    def close(self) -> None:
        if self.hook is not None:
            self.hook.close()
            self.hook = None
