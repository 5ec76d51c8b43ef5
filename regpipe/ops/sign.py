"""Online SIGN: a frozen teacher replaces a fraction of each batch's rows by their SIGN transform.

SIGN (Asgari Taghanaki, Abhishek & Hamarneh 2019; the iteration is written out in
:func:`regpipe.functional.sign`) transforms an input ``p`` into ``p*_K`` by ``K`` steps along the summed
Jacobian of a trained model's last layer before the logits. The paper's protocol is offline: it trains
on the original set plus its ``K = 50`` and ``K = 100`` versions (section 3), so a row of its training
set is original, ``K = 50`` or ``K = 100`` with probability 1/3 each (``regpipe sign`` writes those
versions out). This op is for users who cannot afford that pass over the dataset: the defaults
``fraction=2/3, iters=(50, 100)`` give the same mixture in every batch **(ours)**: ``round(2/3 * N)``
rows are drawn without replacement and split evenly between the ``K`` values (earlier ``K`` values
get the extra row when the split is uneven). Labels, source ids and every other per-row field are
kept; only ``inputs`` of the chosen rows change.

The op follows the op contract (:class:`~regpipe.core.op.BatchOp`): ``draw(batch)`` returns a
:class:`~regpipe.core.sign_plan.SignPlan` (the rows, drawn from the op's seeded generator on the
batch's device, and their ``K``), ``apply(batch, plan)`` is deterministic, ``op(batch)`` is both.

Cost: a transformed row costs ``K`` forward + input-gradient backward passes of the teacher, so the
defaults cost about ``(50 + 100) / 3 = 50`` teacher passes per batch row; with ``at="current"`` the
rows that stop at a smaller ``K`` are not carried further (the iteration continues from the stored
iterate, which is exact: each step depends on the current iterate only).

Example:
    >>> import torch
    >>> from regpipe import Batch
    >>> from regpipe.engine.models import preact_resnet_small
    >>> from regpipe.ops.sign import SignAugment
    >>> op = SignAugment(preact_resnet_small(num_classes=4), fraction=0.5, iters=(2, 4), seed=0)
    >>> batch = Batch.from_labels(torch.randn(8, 3, 32, 32), torch.arange(8) % 4, num_classes=4)
    >>> plan = op.draw(batch)
    >>> out = op.apply(batch, plan)
    >>> changed = (out.inputs != batch.inputs).flatten(1).any(1)
    >>> int(changed.sum()), plan.counts, torch.equal(out.targets, batch.targets)
    (4, (2, 2), True)
    >>> torch.equal(op.apply(batch, plan).inputs, out.inputs)    # replaying the plan
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from regpipe.core.batch import Batch
from regpipe.core.checks import check_finite_number
from regpipe.core.op import BatchOp
from regpipe.core.sign_plan import SignPlan
from regpipe.functional.sign import At, check_snapshots, sign
from regpipe.hooks.features import check_features, tapped_features

__all__ = ["SignAugment", "SignPlan"]


class SignAugment(BatchOp[SignPlan]):
    """Replace ``fraction`` of each batch's rows by their SIGN transform under a frozen teacher.

    Args:
        teacher: the trained model. By default the op keeps its own copy in eval mode with
            ``requires_grad=False`` (so it stays frozen while the student trains, and no weight
            gradients are even computed); ``copy=False`` uses the model as given (its mode is then
            the caller's, and its buffers are written back after every batch).
        fraction: share of each batch's rows transformed, in ``[0, 1]``.
        iters: the ``K`` values; the transformed rows are split evenly between them.
        eta, at, clamp: as in :func:`regpipe.functional.sign` (inputs are the normalised batch).
        layer: feature layer of the teacher (default: its ``features()`` method); see
            :func:`regpipe.hooks.features.tapped_features`.
        seed: seed of the row draw (:meth:`reseed` restarts it, per rank under ``torchrun``).
        copy: keep a frozen copy of ``teacher`` (default) or use it as given.

    Raises:
        TypeError: ``teacher`` is not a ``torch.nn.Module``.
        ValueError: ``fraction`` outside ``[0, 1]``, bad ``iters`` or ``at``, or a teacher without
            ``features()`` and no (or an unknown) ``layer``.
    """

    def __init__(self, teacher: nn.Module, fraction: float = 2 / 3, iters: Sequence[int] = (50, 100),
                 eta: float = 1.0, at: At = "current", clamp: tuple[Any, Any] | None = None,
                 layer: str | None = None, seed: int = 0, copy: bool = True) -> None:
        super().__init__(seed)
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
        self.iters = _check_iters(iters)
        if at not in ("current", "input"):
            raise ValueError(f"at must be 'current' or 'input', got {at!r}")
        eta = check_finite_number("eta", eta, 0.0, low_open=True)  # checked now, not at the first transformed batch
        check_features(teacher, layer)  # the layer / features() is checked now, not mid-training
        self.teacher = _frozen_copy(teacher) if copy else teacher
        self.fraction, self.eta, self.at, self.clamp, self.layer = float(fraction), float(eta), at, clamp, layer

    def draw(self, batch: Batch) -> SignPlan:
        """The rows of ``batch`` to transform: ``round(fraction * N)`` distinct rows from the op's generator
        on ``batch.device``, split evenly over ``iters`` (earlier ``K`` values get the extra rows)."""
        n = batch.size
        m = round(self.fraction * n)
        rows = torch.randperm(n, generator=self.rng.get(batch.device), device=batch.device)[:m]
        base, extra = divmod(m, len(self.iters))
        counts = tuple(base + (1 if j < extra else 0) for j in range(len(self.iters)))
        return SignPlan(rows=rows, iters=self.iters, counts=counts)

    def transform(self, x: torch.Tensor, plan: SignPlan) -> torch.Tensor:
        """SIGN iterates of the rows ``x = inputs[plan.rows]`` (``(M, ...)``), each with its own ``K``."""
        dtype = x.dtype
        x = x.float() if dtype != torch.float64 else x
        kw = {"eta": self.eta, "at": self.at, "clamp": self.clamp}
        with tapped_features(self.teacher, self.layer) as phi:
            if self.at == "input":  # one VJP in all: p + K * eta * delta(p) for every K
                result = sign(phi, x, plan.iters[-1], snapshots=plan.iters, **kw)
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
                current = sign(phi, current, k - done, **kw)
                done = k
                parts.append(current[:count])
                current = current[count:]
            return torch.cat(parts).to(dtype)

    def apply(self, batch: Batch, plan: SignPlan) -> Batch:
        """The batch with the plan's rows transformed (a new inputs tensor; the batch is not mutated).

        Deterministic: the same plan on the same batch gives the same output.

        Raises:
            TypeError: the inputs are not floating point (place the op after the loader's normalisation).
            ValueError: the plan selects rows the batch does not have.
        """
        if not isinstance(plan, SignPlan):
            raise TypeError(f"plan must be a SignPlan, got {type(plan).__name__}")
        if not batch.inputs.dtype.is_floating_point:
            raise TypeError(f"SignAugment needs normalised float inputs, got {batch.inputs.dtype}; "
                            "place it after the loader's normalisation (not with keep_uint8)")
        if plan.rows.numel() == 0:
            return batch
        plan.check_rows(batch.size)
        self._follow(batch.device)
        rows = plan.rows.to(batch.device)
        inputs = batch.inputs.clone()
        inputs[rows] = self.transform(batch.inputs[rows], plan)
        return batch.replace(inputs=inputs)

    def _follow(self, device: torch.device) -> None:
        """Move the teacher to the batch's device on first use (only the op's own copy is moved)."""
        param = next(self.teacher.parameters(), None)
        if param is not None and param.device != device:
            self.teacher.to(device)

    def state_dict(self) -> dict[str, Any]:
        """The row generator and the settings (the teacher is fixed at construction and not included)."""
        return {**super().state_dict(), "fraction": self.fraction, "iters": list(self.iters), "eta": self.eta,
                "at": self.at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked before anything changes).

        Raises:
            KeyError: a missing entry.
            ValueError: a fraction outside ``[0, 1]``, an unknown ``at`` or bad ``iters``.
        """
        fraction = float(state["fraction"])
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"state has fraction {fraction} outside [0, 1]")
        if state["at"] not in ("current", "input"):
            raise ValueError(f"state has an unknown at={state['at']!r}")
        iters = _check_iters([int(k) for k in state["iters"]])
        eta = float(state["eta"])
        super().load_state_dict(state)
        self.iters, self.fraction, self.eta, self.at = iters, fraction, eta, state["at"]


def _check_iters(iters: Sequence[int]) -> tuple[int, ...]:
    """The ``K`` values, ascending and distinct (``ValueError`` for none, or one below 1)."""
    iters = list(iters)
    if not iters:
        raise ValueError("iters must name at least one iteration count K")
    for k in iters:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"iters must be ints, got {k!r}")
    if min(iters) < 1:
        raise ValueError(f"iters must be >= 1, got {min(iters)}")
    return tuple(check_snapshots(max(iters), iters))


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher
