"""PatchUp, pipeline side: draw the per-batch plan on the batch's device (SPEC.md section 2).

The op decides whether PatchUp runs, the layer, the partner permutation, ``lam``, the block-mask
seed and, for input space, the CutMix box; it stores them in ``batch.patchup`` as a
:class:`PatchUpPlan`. The model side (:class:`regpipe.hooks.PatchUpHook`) applies the plan at that
layer and computes the loss from it.

Choices regpipe makes where the official code (chandar-lab/PatchUp) has quirks:

* ``alpha`` is used as given; its default 2.0 is what the official code always uses (its ``--alpha``
  flag is not wired into PatchUp, which hard-codes ``Beta(2, 2)``).
* ``gamma_adj`` is computed for each layer's real, possibly non-square, size every time (the
  official module caches the value of the first map it sees and reuses it at every layer).
* The hidden-layer mask is drawn lazily: the plan stores ``mask_seed`` (an int drawn on the host)
  and :meth:`PatchUpPlan.mask` regenerates the Bernoulli seeds from a fresh ``torch.Generator`` on
  the feature map's device once the shape is known (STYLE 3, the low-memory-dropout pattern). The
  same plan therefore always gives the same mask, on any number of replays.
* Decisions that steer Python control flow (apply or not, the layer, the mask seed) are drawn from
  a CPU generator so that no device synchronisation happens per step; tensors (``perm``, ``lam``,
  the box) are drawn on the batch's device. Both generators are in :meth:`PatchUp.state_dict`.
* Input space (layer 0) is CutMix as in the official code: ``lam ~ Beta(1, 1)``, one box per batch
  (per row with ``per_sample=True``), ``lam`` corrected to the kept area; the plan's ``mode`` is
  ``"hard"`` there (the official targets at layer 0 are the hard-mode ones with ``u = lam``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from regpipe.batch import Batch
from regpipe.functional.patchup import PatchUpMode, block_mask, box_holes, cutmix_box, patchup_gamma
from regpipe.rng import DeviceGenerator

__all__ = ["PatchUp", "PatchUpPlan", "OFFICIAL_BLOCK_SIZES", "OFFICIAL_DEFAULTS"]

#: Block side by layer depth in the official WRN (SPEC 2.2); layer 0 is input space (CutMix).
OFFICIAL_BLOCK_SIZES: dict[int, int] = {1: 7, 2: 7, 3: 5, 4: 3}
#: Official CIFAR settings by mode (SPEC 2, README of the official code): gamma and patchup_prob.
OFFICIAL_DEFAULTS: dict[str, dict[str, float]] = {"soft": {"gamma": 0.75, "patchup_prob": 1.0},
                                                  "hard": {"gamma": 0.5, "patchup_prob": 0.7}}


@dataclass(frozen=True)
class PatchUpPlan:
    """Everything random about one batch's PatchUp step (SPEC 2, steps 1-2 and 5).

    Attributes:
        apply: whether PatchUp runs this batch (else a plain step).
        layer: 0 = input space (CutMix), ``l >= 1`` = after the hook's layer ``l``.
        perm: ``(N,)`` int64 partner permutation, on the batch's device.
        lam: float32, 0-d (one per batch) or ``(N,)`` (per sample); at layer 0 the kept-area fraction.
        mode: ``"hard"`` or ``"soft"`` (always ``"hard"`` at layer 0).
        block_size: block side ``b`` at ``layer`` (0 at layer 0).
        gamma: requested altered fraction (``gamma_adj`` follows from the feature-map size).
        per_sample: one mask per row (``(N, C, H, W)``) instead of one per batch (``(C, H, W)``).
        mask_seed: seed of the generator the hidden-layer Bernoulli seeds are drawn from.
        box: int64 ``(4,)`` or ``(N, 4)`` CutMix box ``(y0, y1, x0, x1)`` at layer 0, else ``None``.
        holes: an explicit mask to use instead of drawing one (replay or tests), else ``None``.
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
        if self.lam.dim() != 0 and self.lam.shape != (n,):
            raise ValueError(f"PatchUpPlan.lam must be 0-d or ({n},), got shape {tuple(self.lam.shape)}")
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

    def mask(self, shape: torch.Size | tuple[int, ...], device: torch.device | str,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``holes`` mask (1 = altered) for a feature map of ``shape`` ``(N, C, H, W)`` (SPEC 2.2).

        Layer 0: the CutMix box, ``(1, H, W)`` or ``(N, 1, H, W)``. Hidden layers: Bernoulli(gamma_adj)
        seeds of shape ``(C, H, W)`` (or ``(N, C, H, W)`` per sample) drawn from a generator seeded
        with ``mask_seed`` on ``device``, expanded by :func:`~regpipe.functional.block_mask`.

        Raises:
            ValueError: the plan does not apply, the row count differs from the plan's, or the block
                is larger than the map.
        """
        if not self.apply:
            raise ValueError("this PatchUp plan does not apply (apply=False): there is no mask")
        if len(shape) != 4:
            raise ValueError(f"PatchUp mixes (N, C, H, W) maps, got shape {tuple(shape)}")
        n, c, height, width = (int(s) for s in shape)
        self.check_rows(n)
        if self.holes is not None:
            return self.holes.to(device=device, dtype=dtype)
        if self.layer == 0:
            return box_holes(self.box.to(device), height, width, dtype)
        p = patchup_gamma(self.gamma, self.block_size, height, width)
        generator = torch.Generator(device=device).manual_seed(self.mask_seed)
        seeds_shape = (n, c, height, width) if self.per_sample else (c, height, width)
        seeds = (torch.rand(seeds_shape, generator=generator, device=device) < p).float()
        return block_mask(seeds, self.block_size).to(dtype)

    @classmethod
    def skip(cls, n: int, device: torch.device | str) -> "PatchUpPlan":
        """A plan that does not apply PatchUp to a batch of ``n`` rows (a plain step)."""
        return cls(apply=False, layer=0, perm=torch.arange(n, device=device),
                   lam=torch.ones((), device=device), mode="hard")


def _beta(alpha: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``Beta(alpha, alpha)`` samples of ``shape`` from ``generator`` (first Dirichlet component)."""
    concentration = torch.full((*shape, 2), float(alpha), device=generator.device)
    return torch._sample_dirichlet(concentration, generator=generator)[..., 0]


class PatchUp:
    """Draw a :class:`PatchUpPlan` per batch and store it in ``batch.patchup`` (SPEC 2).

    Faithful defaults: one ``lam ~ Beta(alpha, alpha)`` per batch (``alpha=2``), one mask for the
    whole batch with independent channels, layer uniform over ``candidate_layers`` with
    layer 0 = CutMix. ``gamma`` and ``patchup_prob`` default to the official CIFAR settings of
    ``mode`` (soft: 0.75 and 1.0; hard: 0.5 and 0.7).

    Args:
        mode: ``"soft"`` or ``"hard"``.
        gamma: requested altered fraction in ``(0, 1]`` (``None``: the mode's official value).
        block_sizes: block side by layer index ``>= 1`` (default ``{1: 7, 2: 7, 3: 5, 4: 3}``).
        candidate_layers: layer indices to choose from per batch (official: ``(0, 1, 2)``).
        patchup_prob: probability that a batch is mixed (``None``: the mode's official value).
        alpha: ``Beta(alpha, alpha)`` parameter of ``lam`` at hidden layers.
        per_sample: draw a mask, ``lam`` and (layer 0) box per row instead of per batch.
        seed: seed of the op's generators.

    Example:
        >>> import torch
        >>> from regpipe import Batch
        >>> from regpipe.ops.patchup import PatchUp
        >>> batch = Batch.from_labels(torch.rand(8, 3, 32, 32), torch.arange(8) % 4, num_classes=4)
        >>> plan = PatchUp(mode="soft", candidate_layers=(1,))(batch).patchup
        >>> plan.apply, plan.layer, plan.perm.shape, plan.mask((8, 16, 32, 32), "cpu").shape
        (True, 1, torch.Size([8]), torch.Size([16, 32, 32]))
    """

    def __init__(self, mode: PatchUpMode = "soft", gamma: float | None = None,
                 block_sizes: dict[int, int] | None = None, candidate_layers: tuple[int, ...] = (0, 1, 2),
                 patchup_prob: float | None = None, alpha: float = 2.0, per_sample: bool = False,
                 seed: int = 0) -> None:
        if mode not in ("soft", "hard"):
            raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
        self.mode: PatchUpMode = mode
        self.gamma = float(OFFICIAL_DEFAULTS[mode]["gamma"] if gamma is None else gamma)
        if not (0.0 < self.gamma <= 1.0):
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.patchup_prob = float(OFFICIAL_DEFAULTS[mode]["patchup_prob"] if patchup_prob is None else patchup_prob)
        if not (0.0 <= self.patchup_prob <= 1.0):
            raise ValueError(f"patchup_prob must be in [0, 1], got {patchup_prob}")
        self.alpha = float(alpha)
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
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
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.rng = DeviceGenerator(seed)  # tensors: perm, lam, box (batch's device)
        self.host_rng = DeviceGenerator(seed + 0x5EED)  # control flow: apply, layer, mask seed (CPU)

    def draw(self, n: int, height: int, width: int, device: torch.device | str) -> PatchUpPlan:
        """Draw the plan for a batch of ``n`` rows of ``height x width`` inputs on ``device``."""
        host = self.host_rng.get("cpu")
        device = torch.device(device)
        # Step 1 (SPEC 2): with probability patchup_prob, else a plain step.
        if float(torch.rand((), generator=host)) >= self.patchup_prob:
            return PatchUpPlan.skip(n, device)
        layer = self.candidate_layers[int(torch.randint(len(self.candidate_layers), (), generator=host))]
        mask_seed = int(torch.randint(2**62, (), generator=host))
        g = self.rng.get(device)
        perm = torch.randperm(n, generator=g, device=device)
        shape = (n,) if self.per_sample else ()
        if layer == 0:
            # SPEC 2.5: CutMix, lam ~ Beta(1, 1) = U(0, 1), corrected to the clipped box area.
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

    def __call__(self, batch: Batch) -> Batch:
        """Return ``batch`` with ``patchup`` set to a freshly drawn plan (inputs are not changed)."""
        n, _, height, width = batch.inputs.shape
        return batch.replace(patchup=self.draw(n, height, width, batch.device))

    def state_dict(self) -> dict[str, Any]:
        """Configuration and the states of both generators (resuming draws the same next plans)."""
        return {"mode": self.mode, "gamma": self.gamma, "block_sizes": dict(self.block_sizes),
                "candidate_layers": list(self.candidate_layers), "patchup_prob": self.patchup_prob,
                "alpha": self.alpha, "per_sample": self.per_sample, "seed": self.seed,
                "rng": self.rng.state_dict(), "host_rng": self.host_rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore configuration (validated as in the constructor) and both generators' states."""
        self.__init__(mode=state["mode"], gamma=state["gamma"],
                      block_sizes={int(k): int(v) for k, v in state["block_sizes"].items()},
                      candidate_layers=tuple(int(x) for x in state["candidate_layers"]),
                      patchup_prob=state["patchup_prob"], alpha=state["alpha"],
                      per_sample=state["per_sample"], seed=int(state["seed"]))
        self.rng.load_state_dict(state["rng"])
        self.host_rng.load_state_dict(state["host_rng"])
