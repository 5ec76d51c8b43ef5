"""Sum Augmentation ops: sample the parameters, then call :func:`regpipe.functional.sum_mix` (SPEC 1)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from regpipe.batch import Batch, MixRecord
from regpipe.functional.sum_mix import check_weights, gcc_weights, mix_sources, sum_mix
from regpipe.rng import DeviceGenerator

__all__ = ["SumMix", "GradualSumMix", "mix_batch"]

MixMode = Literal["group", "permute"]


def mix_batch(batch: Batch, weights: torch.Tensor | list[float], perms: torch.Tensor | None = None,
              drop_remainder: bool = False) -> Batch:
    """Apply :func:`sum_mix` to a whole :class:`Batch`, recording the mix in ``batch.mixing``.

    With a single weight of 1 the batch is returned as it is (nothing to mix).
    """
    w = check_weights(weights)
    k = len(w)
    if k == 1:
        return batch
    inputs, targets = sum_mix(batch.inputs, batch.targets, w, perms=perms, drop_remainder=drop_remainder)
    sources = mix_sources(batch.size, k, perms, drop_remainder).to(batch.device)
    n_out = sources.shape[0]
    weight_table = torch.tensor(w, dtype=torch.float32, device=batch.device).expand(n_out, k)
    record = MixRecord(sources=sources, weights=weight_table, source_ids=batch.source_ids[sources])
    # The affine and photometric record of a mixed row are its first component's (mixing is neither).
    return Batch(inputs=inputs, targets=targets, source_ids=batch.source_ids[sources[:, 0]],
                 affine=batch.affine[sources[:, 0]], mixing=record, patchup=batch.patchup,
                 photometric=None if batch.photometric is None else batch.photometric[sources[:, 0]])


def _draw_perms(k: int, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=generator, device=generator.device) for _ in range(k - 1)]) \
        if k > 1 else torch.empty(0, n, dtype=torch.int64, device=generator.device)


class _MixOp:
    """Shared plumbing of the sum-mixing ops: mode checks and the permutation generator."""

    def __init__(self, mode: MixMode, seed: int, drop_remainder: bool) -> None:
        if mode not in ("group", "permute"):
            raise ValueError(f"mode must be 'group' or 'permute', got {mode!r}")
        self.mode: MixMode = mode
        self.drop_remainder = drop_remainder
        self.rng = DeviceGenerator(seed)

    def _base_state(self) -> dict[str, Any]:
        return {"mode": self.mode, "drop_remainder": self.drop_remainder, "rng": self.rng.state_dict()}

    def _load_base_state(self, state: dict[str, Any]) -> None:
        if state["mode"] not in ("group", "permute"):
            raise ValueError(f"state has an unknown mode {state['mode']!r}")
        self.mode, self.drop_remainder = state["mode"], bool(state["drop_remainder"])
        self.rng.load_state_dict(state["rng"])

    def _mix(self, batch: Batch, weights: torch.Tensor | list[float]) -> Batch:
        k = len(weights)
        perms = None
        if self.mode == "permute" and k > 1:
            perms = _draw_perms(k, batch.size, self.rng.get(batch.device))
        return mix_batch(batch, weights, perms=perms, drop_remainder=self.drop_remainder)


class SumMix(_MixOp):
    """Sum Augmentation with ``k`` equally weighted inputs (SPEC 1.1).

    Group mode (default, the thesis's) turns a batch of ``N`` rows into ``N / k`` mixed rows;
    permutation mode keeps ``N`` rows and mixes each row with ``k - 1`` randomly permuted partners.
    ``k`` may be changed between batches (the :class:`~regpipe.cascade.Cascade` controller does).

    Example:
        >>> import torch
        >>> from regpipe import Batch, SumMix
        >>> batch = Batch.from_labels(torch.rand(8, 3, 4, 4), torch.arange(8) % 4, num_classes=4)
        >>> SumMix(groups=4)(batch).inputs.shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(self, groups: int = 2, mode: MixMode = "group", seed: int = 0, drop_remainder: bool = False) -> None:
        super().__init__(mode, seed, drop_remainder)
        self.groups = groups

    @property
    def groups(self) -> int:
        return self._groups

    @groups.setter
    def groups(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"groups must be an integer >= 1, got {k!r}")
        self._groups = k

    def weights(self) -> list[float]:
        return [1.0 / self.groups] * self.groups

    def __call__(self, batch: Batch) -> Batch:
        return self._mix(batch, self.weights())

    def state_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, **self._base_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.groups = int(state["groups"])
        self._load_base_state(state)


class GradualSumMix(_MixOp):
    """Gradually Cascading Sum Augmentation (SPEC 1.3).

    ``t = min(step / gradual_steps, 1)`` advances with every :meth:`step` (call it after each
    optimizer step); the batch is mixed with :func:`gcc_weights(k0, t) <regpipe.functional.gcc_weights>`.
    Once ``t == 1`` (the fine-tune phase) the batch passes through clean and whole. In group mode
    the group size stays ``N / k0`` during the gradual phase and groups whose weight reached zero are
    not read.

    Example:
        >>> import torch
        >>> from regpipe import Batch, GradualSumMix
        >>> op = GradualSumMix(k0=4, gradual_steps=100)
        >>> batch = Batch.from_labels(torch.rand(8, 3, 4, 4), torch.arange(8) % 4, num_classes=4)
        >>> op(batch).inputs.shape, op.t
        (torch.Size([2, 3, 4, 4]), 0.0)
    """

    def __init__(self, k0: int = 4, gradual_steps: int = 1000, mode: MixMode = "group", seed: int = 0,
                 drop_remainder: bool = False) -> None:
        super().__init__(mode, seed, drop_remainder)
        gcc_weights(k0, 0.0)  # validates k0
        if isinstance(gradual_steps, bool) or not isinstance(gradual_steps, int) or gradual_steps < 1:
            raise ValueError(f"gradual_steps must be an integer >= 1, got {gradual_steps!r}")
        self.k0 = k0
        self.gradual_steps = gradual_steps
        self.step_count = 0

    @property
    def t(self) -> float:
        return min(self.step_count / self.gradual_steps, 1.0)

    def weights(self) -> torch.Tensor:
        return gcc_weights(self.k0, self.t)

    def step(self) -> None:
        """Advance the schedule by one optimizer step."""
        self.step_count += 1

    def __call__(self, batch: Batch) -> Batch:
        if self.t >= 1.0:
            return batch
        return self._mix(batch, self.weights())

    def state_dict(self) -> dict[str, Any]:
        return {"k0": self.k0, "gradual_steps": self.gradual_steps, "step_count": self.step_count,
                **self._base_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k0 = int(state["k0"])
        self.gradual_steps = int(state["gradual_steps"])
        self.step_count = int(state["step_count"])
        self._load_base_state(state)
