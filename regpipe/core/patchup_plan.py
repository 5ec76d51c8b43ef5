"""The PatchUp plan: every random choice of one batch's PatchUp step, as a frozen value.

The pipeline side (:class:`regpipe.ops.PatchUp`) draws a plan and attaches it to ``Batch.patchup``;
the model side (:class:`regpipe.hooks.PatchUpHook`) applies it at the plan's layer. The plan lives in
the core layer because :class:`~regpipe.core.batch.Batch` carries it; it holds data only. Turning it
into a mask needs the block-mask math of :mod:`regpipe.functional.patchup`, which the core layer may
not import, so that step is :func:`regpipe.hooks.patchup.plan_mask`.

PatchUp is Faramarzi, Amini, Badrinaaraayanan, Verma and Chandar, "PatchUp: A Feature-Space Block-Level
Regularization Technique for Convolutional Neural Networks" (2020): per mini-batch, with probability
``patchup_prob``, pick a layer, a partner permutation, a mixing weight ``lam`` and a block mask, then mix
the chosen blocks of each row's feature map with its partner's (input space: CutMix).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["PatchUpMode", "PatchUpPlan"]

#: Hard PatchUp swaps the masked blocks; soft PatchUp interpolates them with weight ``lam``. (The same
#: alias is defined in :mod:`regpipe.functional.patchup`, which the core layer cannot import.)
PatchUpMode = Literal["hard", "soft"]


@dataclass(frozen=True)
class PatchUpPlan:
    """Everything random about one batch's PatchUp step.

    The hidden-layer mask is not stored: it is regenerated from ``mask_seed`` once the feature map's
    shape is known (:func:`regpipe.hooks.patchup.plan_mask`), so a plan is a few scalars and ``(N,)``
    tensors, and the same plan always gives the same mask.

    Attributes:
        apply: whether PatchUp runs this batch (else a plain step).
        layer: 0 = input space (CutMix), ``l >= 1`` = after the hook's layer ``l``.
        perm: ``(N,)`` int64 partner permutation, on the batch's device.
        lam: float32, 0-d (one per batch) or ``(N,)`` (per sample); at layer 0 the kept-area fraction.
        mode: ``"hard"`` or ``"soft"`` (always ``"hard"`` at layer 0).
        block_size: block side ``b`` at ``layer`` (0 at layer 0).
        gamma: requested altered fraction (the Bernoulli seed rate follows from the feature-map size).
        per_sample: one mask per row (``(N, C, H, W)``) instead of one per batch (``(C, H, W)``).
        mask_seed: seed of the generator the hidden-layer Bernoulli seeds are drawn from.
        box: int64 ``(4,)`` or ``(N, 4)`` CutMix box ``(y0, y1, x0, x1)`` (half-open) at layer 0, else ``None``.
        holes: an explicit mask (1 = altered) to use instead of drawing one (replay or tests), else ``None``.

    Raises:
        ValueError: an unknown mode, a ``perm`` that is not 1-D int64, a ``lam`` of the wrong shape, a
            negative layer, an applied layer-0 plan without a box, or an applied hidden-layer plan
            without a block size.
    """

    apply: bool
    layer: int
    perm: torch.Tensor
    lam: torch.Tensor
    mode: PatchUpMode
    block_size: int = 0
    gamma: float = 0.0
    per_sample: bool = False
    mask_seed: int = 0
    box: torch.Tensor | None = None
    holes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("hard", "soft"):
            raise ValueError(f"PatchUpPlan.mode must be 'hard' or 'soft', got {self.mode!r}")
        if not isinstance(self.perm, torch.Tensor) or self.perm.dim() != 1 or self.perm.dtype != torch.int64:
            raise ValueError(f"PatchUpPlan.perm must be a 1-D int64 tensor, got {getattr(self.perm, 'shape', self.perm)}")
        n = self.perm.shape[0]
        if not isinstance(self.lam, torch.Tensor) or (self.lam.dim() != 0 and self.lam.shape != (n,)):
            raise ValueError(f"PatchUpPlan.lam must be a 0-d or ({n},) tensor, got {getattr(self.lam, 'shape', self.lam)}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"PatchUpPlan.layer must be an integer >= 0, got {self.layer!r}")
        if self.apply and self.layer == 0 and self.box is None and self.holes is None:
            raise ValueError("a PatchUpPlan at layer 0 needs a CutMix box (or explicit holes)")
        if self.apply and self.layer > 0 and self.holes is None and self.block_size < 1:
            raise ValueError(f"PatchUpPlan.block_size must be >= 1 at layer {self.layer}, got {self.block_size}")

    @property
    def batch_size(self) -> int:
        """Number of rows ``N`` the plan was drawn for."""
        return self.perm.shape[0]

    def check_rows(self, n: int) -> None:
        """Raise ``ValueError`` when a tensor of ``n`` rows meets a plan drawn for another batch size."""
        if n != self.batch_size:
            raise ValueError(f"this PatchUp plan was drawn for a batch of {self.batch_size} rows, "
                             f"got a tensor of {n} rows")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PatchUpPlan":
        """The same plan with its tensors (``perm``, ``lam``, ``box``, ``holes``) on ``device``."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return dataclasses.replace(self, perm=move(self.perm), lam=move(self.lam), box=move(self.box),
                                   holes=move(self.holes))

    @classmethod
    def skip(cls, n: int, device: torch.device | str) -> "PatchUpPlan":
        """A plan that does not apply PatchUp to a batch of ``n`` rows (a plain step)."""
        return cls(apply=False, layer=0, perm=torch.arange(n, device=device),
                   lam=torch.ones((), device=device), mode="hard")
