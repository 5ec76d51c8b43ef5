"""PatchUp, pipeline side: draw the per-batch plan on the batch's device.

PatchUp (Faramarzi, Amini, Badrinaaraayanan, Verma and Chandar, 2020, "PatchUp: A Feature-Space
Block-Level Regularization Technique for Convolutional Neural Networks", section 2) mixes contiguous
blocks of one hidden feature map between pairs of rows. The op makes every random choice of a step
-- whether PatchUp runs, the layer, the partner permutation, ``lam``, the block-mask seed and, for
input space, the CutMix box -- and attaches them to ``batch.patchup`` as a
:class:`~regpipe.core.patchup_plan.PatchUpPlan`. The model side (:class:`regpipe.hooks.PatchUpHook`)
applies the plan at that layer and computes the loss from it.

Choices regpipe makes where the official code (github.com/chandar-lab/PatchUp) has quirks:

* ``alpha`` is used as given; its default 2.0 is what the official code always uses (its ``--alpha``
  flag is not wired into PatchUp, which hard-codes ``Beta(2, 2)``).
* ``gamma_adj`` is computed for each layer's real, possibly non-square, size every time (the
  official module caches the value of the first map it sees and reuses it at every layer).
* The hidden-layer mask is drawn lazily: the plan stores ``mask_seed`` (an int drawn on the host)
  and :func:`regpipe.hooks.patchup.plan_mask` regenerates the Bernoulli seeds from a fresh
  ``torch.Generator`` on the feature map's device once the shape is known (the pattern of Triton's
  low-memory dropout tutorial: a seed instead of a stored mask). The same plan therefore always
  gives the same mask, on any number of replays.
* Decisions that steer Python control flow (apply or not, the layer, the mask seed) are drawn from
  a CPU generator so that no device synchronisation happens per step; tensors (``perm``, ``lam``,
  the box) are drawn on the batch's device. Both generators are in :meth:`PatchUp.state_dict`.
* Input space (layer 0) is CutMix as in the official code: ``lam ~ Beta(1, 1)``, one box per batch
  (per row with ``per_sample=True``), ``lam`` corrected to the kept area; the plan's ``mode`` is
  ``"hard"`` there (the paper's "PatchUp in Input Space": only the hard operation, one rectangle).
"""

from __future__ import annotations

from typing import Any

import torch

from regpipe.core.batch import Batch
from regpipe.core.checks import check_finite_number
from regpipe.core.op import BatchOp
from regpipe.core.patchup_plan import PatchUpMode, PatchUpPlan
from regpipe.core.rng import DeviceGenerator, rank_seed
from regpipe.functional.patchup import cutmix_box

# PatchUpPlan lives in regpipe.core (Batch carries it); it is re-exported here for existing imports.
__all__ = ["OFFICIAL_BLOCK_SIZES", "OFFICIAL_DEFAULTS", "PatchUp", "PatchUpPlan"]

#: Block side by layer depth in the official WideResNet (7, 7, 5, 3 for layers 1..4); layer 0 is
#: input space (CutMix) and has no block.
OFFICIAL_BLOCK_SIZES: dict[int, int] = {1: 7, 2: 7, 3: 5, 4: 3}
#: Official CIFAR settings by mode (README of the official code): gamma and patchup_prob.
OFFICIAL_DEFAULTS: dict[str, dict[str, float]] = {"soft": {"gamma": 0.75, "patchup_prob": 1.0},
                                                  "hard": {"gamma": 0.5, "patchup_prob": 0.7}}

# The host generator's seed is the op's seed plus this offset, so the two streams differ.
_HOST_SEED_OFFSET = 0x5EED


def _beta(alpha: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``Beta(alpha, alpha)`` samples of ``shape`` from ``generator`` (first Dirichlet component)."""
    concentration = torch.full((*shape, 2), float(alpha), device=generator.device)
    return torch._sample_dirichlet(concentration, generator=generator)[..., 0]


class PatchUp(BatchOp[PatchUpPlan]):
    """Draw a :class:`~regpipe.core.patchup_plan.PatchUpPlan` per batch and attach it to ``batch.patchup``.

    Per batch (Faramarzi et al. 2020, section 2), with probability ``patchup_prob`` (else a plan with
    ``apply=False``, a plain step):

    * a layer ``l`` uniformly from ``candidate_layers`` and a partner permutation ``pi`` of the rows;
    * hidden layers (``l >= 1``): ``lam ~ Beta(alpha, alpha)``, the weight a row keeps of its own
      patches in soft mode (eq. 5), and a mask seed. The mask is regenerated from it at the layer:
      every feature is a block seed with probability ``gamma_adj = gamma / b^2 * (H * W) /
      ((H - b + 1) * (W - b + 1))`` (eq. 2, ``b`` the layer's block size, ``H x W`` the map), and
      each seed alters the ``b x b`` square around it;
    * input space (``l = 0``): CutMix (Yun et al. 2019), ``lam0 ~ U(0, 1)`` and a uniform box centre;
      the box has sides ``floor(H * sqrt(1 - lam0))`` by ``floor(W * sqrt(1 - lam0))``, is clipped to
      the image, and ``lam`` becomes the kept area fraction.

    Faithful defaults: one ``lam`` per batch (``alpha=2``), one mask for the whole batch with
    independent channels, layer uniform over ``candidate_layers`` with layer 0 = CutMix. ``gamma`` and
    ``patchup_prob`` default to the official CIFAR settings of ``mode`` (soft: 0.75 and 1.0; hard:
    0.5 and 0.7).

    Args:
        mode: ``"soft"`` or ``"hard"``.
        gamma: requested altered fraction in ``(0, 1]`` (``None``: the mode's official value).
        block_sizes: block side by layer index ``>= 1`` (default ``{1: 7, 2: 7, 3: 5, 4: 3}``).
        candidate_layers: layer indices to choose from per batch (official: ``(0, 1, 2)``).
        patchup_prob: probability that a batch is mixed (``None``: the mode's official value).
        alpha: ``Beta(alpha, alpha)`` parameter of ``lam`` at hidden layers.
        per_sample: draw a mask, ``lam`` and (layer 0) box per row instead of per batch.
        seed: seed of the op's generators (the tensor one uses ``seed``, the host one ``seed + 0x5EED``).

    Example:
        >>> import torch
        >>> from regpipe import Batch
        >>> from regpipe.hooks.patchup import plan_mask
        >>> from regpipe.ops.patchup import PatchUp
        >>> batch = Batch.from_labels(torch.rand(8, 3, 32, 32), torch.arange(8) % 4, num_classes=4)
        >>> op = PatchUp(mode="soft", candidate_layers=(1,))
        >>> plan = op.draw(batch)
        >>> op.apply(batch, plan).patchup is plan
        True
        >>> plan.apply, plan.layer, plan.perm.shape, plan_mask(plan, (8, 16, 32, 32), "cpu").shape
        (True, 1, torch.Size([8]), torch.Size([16, 32, 32]))
    """

    def __init__(self, mode: PatchUpMode = "soft", gamma: float | None = None,
                 block_sizes: dict[int, int] | None = None, candidate_layers: tuple[int, ...] = (0, 1, 2),
                 patchup_prob: float | None = None, alpha: float = 2.0, per_sample: bool = False,
                 seed: int = 0) -> None:
        super().__init__(seed)  # self.rng: tensors (perm, lam, box) on the batch's device
        self._configure(mode, gamma, block_sizes, candidate_layers, patchup_prob, alpha, per_sample)
        self.seed = seed
        self.host_rng = DeviceGenerator(seed + _HOST_SEED_OFFSET)  # control flow: apply, layer, mask seed (CPU)

    def _configure(self, mode: PatchUpMode, gamma: float | None, block_sizes: dict[int, int] | None,
                   candidate_layers: tuple[int, ...], patchup_prob: float | None, alpha: float,
                   per_sample: bool) -> None:
        """Validate and set the hyper-parameters (shared by the constructor and :meth:`load_state_dict`)."""
        if mode not in ("soft", "hard"):
            raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
        self.mode: PatchUpMode = mode
        self.gamma = float(OFFICIAL_DEFAULTS[mode]["gamma"] if gamma is None else gamma)
        if not (0.0 < self.gamma <= 1.0):
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.patchup_prob = float(OFFICIAL_DEFAULTS[mode]["patchup_prob"] if patchup_prob is None else patchup_prob)
        if not (0.0 <= self.patchup_prob <= 1.0):
            raise ValueError(f"patchup_prob must be in [0, 1], got {patchup_prob}")
        self.alpha = check_finite_number("alpha", alpha, 0.0, low_open=True)  # Beta(alpha, alpha)
        self.block_sizes = dict(OFFICIAL_BLOCK_SIZES if block_sizes is None else block_sizes)
        for layer, b in self.block_sizes.items():
            if isinstance(b, bool) or not isinstance(b, int) or b < 1 or not isinstance(layer, int) or layer < 1:
                raise ValueError(f"block_sizes must map layer indices >= 1 to sizes >= 1, got {layer!r}: {b!r}")
        self.candidate_layers = tuple(candidate_layers)
        if not self.candidate_layers:
            raise ValueError("candidate_layers must not be empty")
        for layer in self.candidate_layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"candidate layers must be integers >= 0, got {layer!r}")
            if layer > 0 and layer not in self.block_sizes:
                raise ValueError(f"candidate layer {layer} has no block size; block_sizes has {sorted(self.block_sizes)}")
        self.per_sample = bool(per_sample)

    def draw(self, batch: Batch) -> PatchUpPlan:
        """The plan for ``batch`` (its row count, image size and device); ``batch`` itself is not read."""
        n, _, height, width = batch.inputs.shape
        device = batch.device
        host = self.host_rng.get("cpu")
        # With probability patchup_prob PatchUp runs, else a plain step.
        if float(torch.rand((), generator=host)) >= self.patchup_prob:
            return PatchUpPlan.skip(n, device)
        layer = self.candidate_layers[int(torch.randint(len(self.candidate_layers), (), generator=host))]
        mask_seed = int(torch.randint(2**62, (), generator=host))
        g = self.rng.get(device)
        perm = torch.randperm(n, generator=g, device=device)
        shape = (n,) if self.per_sample else ()
        if layer == 0:
            # CutMix: lam ~ Beta(1, 1) = U(0, 1), corrected to the clipped box area.
            lam0 = torch.rand(shape, generator=g, device=device)
            cy = torch.randint(height, shape, generator=g, device=device)
            cx = torch.randint(width, shape, generator=g, device=device)
            box, kept = cutmix_box(height, width, lam0, (cy, cx))
            return PatchUpPlan(apply=True, layer=0, perm=perm, lam=kept, mode="hard", gamma=self.gamma,
                               per_sample=self.per_sample, mask_seed=mask_seed, box=box)
        lam = _beta(self.alpha, shape, g)
        return PatchUpPlan(apply=True, layer=layer, perm=perm, lam=lam, mode=self.mode,
                           block_size=self.block_sizes[layer], gamma=self.gamma, per_sample=self.per_sample,
                           mask_seed=mask_seed)

    def apply(self, batch: Batch, params: PatchUpPlan) -> Batch:
        """``batch`` with ``patchup`` set to ``params`` (inputs unchanged; a previous plan is replaced).

        Raises:
            TypeError: ``params`` is not a :class:`~regpipe.core.patchup_plan.PatchUpPlan`.
            ValueError: the plan was drawn for another number of rows.
        """
        if not isinstance(params, PatchUpPlan):
            raise TypeError(f"PatchUp.apply needs a PatchUpPlan, got {type(params).__name__}")
        params.check_rows(batch.size)
        return batch.replace(patchup=params)

    def reseed(self, seed: int, rank: int = 0) -> None:
        """Restart both generators as a fresh ``PatchUp(seed=rank_seed(seed, rank))`` would have them."""
        super().reseed(seed, rank)
        self.seed = rank_seed(seed, rank)
        self.host_rng.reseed(self.seed + _HOST_SEED_OFFSET)

    def state_dict(self) -> dict[str, Any]:
        """Configuration and the states of both generators (resuming draws the same next plans)."""
        return {"mode": self.mode, "gamma": self.gamma, "block_sizes": dict(self.block_sizes),
                "candidate_layers": list(self.candidate_layers), "patchup_prob": self.patchup_prob,
                "alpha": self.alpha, "per_sample": self.per_sample, "seed": self.seed,
                **super().state_dict(), "host_rng": self.host_rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore configuration (validated as in the constructor) and both generators' states."""
        self._configure(mode=state["mode"], gamma=state["gamma"],
                        block_sizes={int(k): int(v) for k, v in state["block_sizes"].items()},
                        candidate_layers=tuple(int(x) for x in state["candidate_layers"]),
                        patchup_prob=state["patchup_prob"], alpha=state["alpha"], per_sample=state["per_sample"])
        super().load_state_dict(state)
        self.seed = int(state["seed"])
        self.host_rng.load_state_dict(state["host_rng"])
