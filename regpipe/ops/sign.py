"""Online SIGN (SPEC 5): a frozen teacher replaces a fraction of each batch's rows by their SIGN transform.

For users who cannot afford the offline pass over the dataset (``regpipe sign``). Labels, source ids
and every other per-row field are kept; only ``inputs`` of the chosen rows change.

The paper trains on the original set plus its ``K = 50`` and ``K = 100`` versions, so a row of its
training set is original, ``K = 50`` or ``K = 100`` with probability 1/3 each. The defaults
``fraction=2/3, iters=(50, 100)`` give that mixture in every batch **(ours)**: ``round(2/3 * N)``
rows are drawn without replacement and split evenly between the ``K`` values (earlier ``K`` values
get the extra row when the split is uneven). The rows are drawn from a seeded generator on the
batch's device, and everything random is a :class:`SignPlan` (draw, then apply).

Cost: a transformed row costs ``K`` forward + input-gradient backward passes of the teacher, so the
defaults cost about ``(50 + 100) / 3 = 50`` teacher passes per batch row; with ``at="current"`` the
rows that stop at a smaller ``K`` are not carried further (the iteration continues from the stored
iterate, which is exact: each step depends on the current iterate only).

Example:
    >>> import torch
    >>> from regpipe import Batch
    >>> from regpipe.models import preact_resnet_small
    >>> from regpipe.ops.sign import SignAugment
    >>> op = SignAugment(preact_resnet_small(num_classes=4), fraction=0.5, iters=(2, 4), seed=0)
    >>> batch = Batch.from_labels(torch.randn(8, 3, 32, 32), torch.arange(8) % 4, num_classes=4)
    >>> out = op(batch)
    >>> changed = (out.inputs != batch.inputs).flatten(1).any(1)
    >>> int(changed.sum()), torch.equal(out.targets, batch.targets)
    (4, True)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from regpipe.batch import Batch
from regpipe.functional.sign import check_snapshots, feature_fn, sign
from regpipe.rng import DeviceGenerator

__all__ = ["SignAugment", "SignPlan"]


@dataclass(frozen=True)
class SignPlan:
    """Which rows of a batch are transformed, and with how many iterations.

    Attributes:
        rows: ``(M,)`` int64 row indices (distinct), on the batch's device, grouped by ``K``: the first
            ``counts[0]`` get ``iters[0]``, the next ``counts[1]`` get ``iters[1]``, ...
        iters: the ``K`` values, ascending.
        counts: rows per ``K`` (host ints; ``sum(counts) == M``).
    """

    rows: torch.Tensor
    iters: tuple[int, ...]
    counts: tuple[int, ...]


class SignAugment:
    """Replace ``fraction`` of each batch's rows by their SIGN transform under a frozen teacher.

    Args:
        teacher: the trained model. By default the op keeps its own copy in eval mode with
            ``requires_grad=False`` (so it stays frozen while the student trains, and no weight
            gradients are even computed); ``copy=False`` uses the model as given (its mode is then
            the caller's, and :func:`~regpipe.functional.sign` restores its buffers).
        fraction: share of each batch's rows transformed, in ``[0, 1]``.
        iters: the ``K`` values; the transformed rows are split evenly between them.
        eta, at, clamp: as in :func:`regpipe.functional.sign` (inputs are the normalised batch).
        layer: feature layer of the teacher (default: its ``features()`` method).
        seed: seed of the row draw.

    Raises:
        ValueError: ``fraction`` outside ``[0, 1]``, bad ``iters``, or a teacher without ``features()``
            and no ``layer``.
    """

    def __init__(self, teacher: nn.Module, fraction: float = 2 / 3, iters: Sequence[int] = (50, 100),
                 eta: float = 1.0, at: Literal["current", "input"] = "current",
                 clamp: tuple[Any, Any] | None = None, layer: str | None = None, seed: int = 0,
                 copy: bool = True) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
        iters = list(iters)
        if not iters:
            raise ValueError("iters must name at least one iteration count K")
        self.iters = tuple(check_snapshots(max(iters), iters))
        if at not in ("current", "input"):
            raise ValueError(f"at must be 'current' or 'input', got {at!r}")
        self.teacher = _frozen_copy(teacher) if copy else teacher
        self.features = feature_fn(self.teacher, layer)  # checks the layer / features() now, not mid-training
        self.fraction, self.eta, self.at, self.clamp, self.layer = float(fraction), float(eta), at, clamp, layer
        self.rng = DeviceGenerator(seed)

    def draw(self, n: int, device: torch.device | str) -> SignPlan:
        """Draw the rows of a batch of ``n`` rows (``round(fraction * n)`` of them, split evenly over ``iters``)."""
        m = round(self.fraction * n)
        rows = torch.randperm(n, generator=self.rng.get(device), device=device)[:m]
        base, extra = divmod(m, len(self.iters))
        counts = tuple(base + (1 if j < extra else 0) for j in range(len(self.iters)))
        return SignPlan(rows=rows, iters=self.iters, counts=counts)

    def transform(self, x: torch.Tensor, plan: SignPlan) -> torch.Tensor:
        """SIGN iterates of the rows ``x = inputs[plan.rows]`` (``(M, ...)``), each with its own ``K``."""
        dtype = x.dtype
        x = x.float() if dtype != torch.float64 else x
        kw = {"eta": self.eta, "at": self.at, "clamp": self.clamp}
        if self.at == "input":  # one VJP in all: p + K * eta * delta(p) for every K
            result = sign(self.features, x, plan.iters[-1], snapshots=plan.iters, **kw)
            parts, start = [], 0
            for k, count in zip(plan.iters, plan.counts):
                parts.append(result[k][start:start + count])
                start += count
            return torch.cat(parts).to(dtype)
        # at="current": carry only the rows that still need iterations; the iteration is Markov, so
        # continuing from the K_j iterate for K_{j+1} - K_j steps equals one run of K_{j+1} steps.
        parts, current, done = [], x, 0
        for k, count in zip(plan.iters, plan.counts):
            if count == 0:
                continue
            current = sign(self.features, current, k - done, **kw)
            done = k
            parts.append(current[:count])
            current = current[count:]
        return torch.cat(parts).to(dtype)

    def apply(self, batch: Batch, plan: SignPlan) -> Batch:
        """The batch with the plan's rows transformed (a new inputs tensor; the batch is not mutated)."""
        if not batch.inputs.dtype.is_floating_point:
            raise TypeError(f"SignAugment needs normalised float inputs, got {batch.inputs.dtype}; "
                            "place it after the loader's normalisation (not with keep_uint8)")
        if plan.rows.numel() == 0:
            return batch
        self._follow(batch.device)
        inputs = batch.inputs.clone()
        inputs[plan.rows] = self.transform(batch.inputs[plan.rows], plan)
        return batch.replace(inputs=inputs)

    def __call__(self, batch: Batch, plan: SignPlan | None = None) -> Batch:
        return self.apply(batch, plan if plan is not None else self.draw(batch.size, batch.device))

    def _follow(self, device: torch.device) -> None:
        """Move the teacher to the batch's device on first use (only the op's own copy is moved)."""
        param = next(self.teacher.parameters(), None)
        if param is not None and param.device != device:
            self.teacher.to(device)

    def state_dict(self) -> dict[str, Any]:
        """The row generator and the settings (the teacher is fixed at construction and not included)."""
        return {"fraction": self.fraction, "iters": list(self.iters), "eta": self.eta, "at": self.at,
                "rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fraction = float(state["fraction"])
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"state has fraction {fraction} outside [0, 1]")
        if state["at"] not in ("current", "input"):
            raise ValueError(f"state has an unknown at={state['at']!r}")
        iters = [int(k) for k in state["iters"]]
        self.iters = tuple(check_snapshots(max(iters), iters))
        self.fraction, self.eta, self.at = fraction, float(state["eta"]), state["at"]
        self.rng.load_state_dict(state["rng"])


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher
