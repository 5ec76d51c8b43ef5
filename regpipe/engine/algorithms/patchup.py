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
        """Build the op and the hook; when the run gives its image shape, check the layers before the first step
        (:meth:`_check_layers`)."""
        layers = self.config.layers
        self.op = PatchUp(mode=self.mode, candidate_layers=tuple(range(len(layers) + 1)), seed=run.seed)
        self.hook = PatchUpHook(run.model, list(layers))
        shape = run.known_image_shape()
        if shape is not None:
            self._check_layers(run.model, shape)

    def _check_layers(self, model: torch.nn.Module, image_shape: tuple[int, int, int]) -> None:
        """One forward of a zero image of ``image_shape``: every layer must give an ``(N, C, H, W)`` map
        (:meth:`PatchUpHook.check_feature_maps`) at least as large as the layer's block.

        Raises:
            ValueError: the layer, what it gives or its map size and the block size are named.
        """
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        shapes = self.hook.check_feature_maps(torch.zeros(1, *image_shape, device=device))
        for index, shape in shapes.items():
            block = self.op.block_sizes[index]
            if block > min(shape[-2:]):
                raise ValueError(f"PatchUp layer {index} ({self.hook.layers[index]!r}) gives {shape[-2]}x{shape[-1]} "
                                 f"feature maps, smaller than its {block}x{block} blocks: name an earlier layer")

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
