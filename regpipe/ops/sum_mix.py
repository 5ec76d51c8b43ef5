"""Sum Augmentation ops: draw a :class:`~regpipe.core.mix_plan.MixPlan`, then execute it.

Sum Augmentation, Cascading and Gradually Cascading Sum Augmentation are from C. Simionescu, *Deep
Learning Training Procedure Augmentations* (MSc thesis, Alexandru Ioan Cuza University, 2020;
arXiv:2211.14395), chapter 3. Both ops follow the op contract (:class:`~regpipe.core.op.BatchOp`):
``draw(batch)`` returns the batch's :class:`MixPlan` (rows and weights on the batch's device, drawn without
reading any device value on the host), ``apply(batch, plan)`` mixes deterministically.

Who executes the plan is the caller's choice, never a module setting: ``apply(batch, plan)`` sums the rows
with the torch reference :func:`regpipe.functional.sum_mix.mix_rows`; ``apply(batch, plan, executor=f)`` (and
:meth:`RowMixOp.mix`) computes the inputs with ``f(inputs, plan)`` instead, which is how a loader's device
stage runs the fused uint8 -> normalise -> mix kernel of ``regpipe.kernels``. Targets always go through
:func:`~regpipe.functional.sum_mix.mix_rows` (they are ``(N, K)``, tiny).

A batch that carries a PatchUp plan cannot be mixed: the plan pairs the rows of the batch as it was
given, so draw PatchUp after mixing (:func:`mix_batch` raises ``ValueError`` otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from regpipe.core.batch import Batch, MixRecord
from regpipe.core.mix_plan import MixPlan
from regpipe.core.op import BatchOp
from regpipe.functional.partners import draw_mix_sources, group_rows
from regpipe.functional.sum_mix import check_weights, gcc_coefficients, mix_rows

__all__ = ["Executor", "GradualSumMix", "RowMixOp", "SumMix", "mix_batch"]

MixMode = Literal["group", "permute"]

#: ``(inputs (N, C, H, W), plan) -> mixed inputs (N_out, C, H, W)``: what executes a plan's input mix when the
#: torch reference does not (a loader's fused stage, which also converts and normalises uint8 pixels).
Executor = Callable[[torch.Tensor, MixPlan], torch.Tensor]


def _refuse_patchup_plan(batch: Batch, k: int, rows_out: int) -> None:
    """Raise when a batch carrying a PatchUp plan is about to be mixed.

    The plan's partner permutation and ``lam`` refer to the rows as given; after mixing, rows are new
    combinations (and in group mode fewer), so no plan stays valid — even when the row count is kept.
    """
    plan = batch.patchup
    if plan is not None:
        raise ValueError(f"this batch carries a PatchUp plan drawn for {plan.batch_size} rows; mixing {k} inputs "
                         f"per row gives {rows_out} new rows, which the plan does not describe: draw PatchUp "
                         "after mixing")


def mix_batch(batch: Batch, plan: MixPlan, *, keep_parent: bool = False, executor: Executor | None = None) -> Batch:
    """Execute a :class:`MixPlan` on a whole :class:`Batch`, recording the mix in ``batch.mixing``.

    Output row ``i`` is ``sum_g w[i, g] * x[s[i, g]]`` (targets alike, weights added per class), with
    ``s = plan.sources`` and ``w = plan.weights``. The output's ``source_ids``, ``affine`` and
    ``photometric`` are those of each row's first component ``s[i, 0]`` (mixing is neither geometric nor
    photometric); ``mixing`` holds all components, and ``replicas`` is the plan's ``groups`` (the mixed
    rows keep their replica groups only when the plan drew the copies of a seed with the same partners).
    An identity plan (:meth:`MixPlan.unmixed`) returns the batch as it is.

    Args:
        batch: ``N`` rows, no PatchUp plan.
        plan: the mix, on the batch's device, drawn for its ``N`` rows.
        keep_parent: record the unmixed inputs and targets in the :class:`MixRecord` (a reference, not a
            copy: it keeps the pre-mix batch alive as long as the mixed one), for losses that compare a
            mixed row with its components (the saliency consistency loss).
        executor: computes the mixed inputs, ``executor(batch.inputs, plan)`` (a loader's fused stage);
            ``None``: :func:`~regpipe.functional.sum_mix.mix_rows` (uint8 inputs give float32 in 0..255).

    Returns:
        The mixed batch, ``plan.rows_out`` rows, with a :class:`MixRecord`.

    Raises:
        TypeError: ``plan`` is not a :class:`MixPlan`.
        ValueError: a plan for another device or batch size (host plans: their rows are checked too), or a
            batch carrying a PatchUp plan.
    """
    if not isinstance(plan, MixPlan):
        raise TypeError(f"mix_batch needs a MixPlan, got {type(plan).__name__}")
    if plan.device != batch.device:
        raise ValueError(f"the plan is on {plan.device}, the batch on {batch.device}")
    if plan.identity:
        if plan.rows_out != batch.size:
            raise ValueError(f"this identity plan is for {plan.rows_out} rows, the batch has {batch.size}")
        return batch
    _refuse_patchup_plan(batch, plan.k, plan.rows_out)
    plan.check_rows(batch.size)
    inputs = mix_rows(batch.inputs, plan) if executor is None else executor(batch.inputs, plan)
    targets = mix_rows(batch.targets, plan)
    record = MixRecord(sources=plan.sources, weights=plan.weights, source_ids=batch.source_ids[plan.sources],
                       parent_inputs=batch.inputs if keep_parent else None,
                       parent_targets=batch.targets if keep_parent else None)
    first = plan.sources[:, 0]
    return Batch(inputs=inputs, targets=targets, source_ids=batch.source_ids[first], affine=batch.affine[first],
                 mixing=record, photometric=None if batch.photometric is None else batch.photometric[first],
                 replicas=plan.groups)


def _check_mode(mode: str) -> MixMode:
    if mode not in ("group", "permute"):
        raise ValueError(f"mode must be 'group' or 'permute', got {mode!r}")
    return mode  # type: ignore[return-value]


class RowMixOp(BatchOp[MixPlan]):
    """Base of the ops whose mix is a weighted row sum (:class:`SumMix`, :class:`GradualSumMix`,
    :class:`~regpipe.ops.cutmix.MixUp`): ``draw`` makes a :class:`MixPlan`, ``apply`` executes it.

    What a loader's device stage relies on (:class:`regpipe.loaders.common.BatchBuilder`): :meth:`mix`, which
    draws and applies with the stage's executor, and ``keep_parent`` (a batch whose unmixed rows are kept
    must be normalised before it is mixed, so the kept rows are too).

    Partners (:func:`~regpipe.functional.partners.draw_mix_sources`): group mode ``g * n + i``; permutation
    mode ``randperm`` columns from the op's generator; on a replicated batch (``Batch.replicas = m > 1``)
    copies of other seeds, drawn at the seed level on the device. With ``keep_groups`` the ``m`` copies of a
    seed mix with the same partner seeds (one arrangement of the seeds for every copy index), so the mixed
    batch keeps ``replicas = m`` for a consistency loss; without it every copy meets its own partners.

    Args:
        mode: ``"group"`` or ``"permute"``.
        seed: seed of the partner generator.
        drop_remainder: plain group mode: drop the last ``N % k`` rows instead of raising.
        keep_parent: keep the unmixed rows in ``batch.mixing`` (see :func:`mix_batch`).
        keep_groups: on a replicated batch, mix the copies of a seed alike and keep the replica groups.
    """

    def __init__(self, mode: MixMode, seed: int, drop_remainder: bool, keep_parent: bool,
                 keep_groups: bool = False) -> None:
        super().__init__(seed)
        self.mode: MixMode = _check_mode(mode)
        self.drop_remainder = bool(drop_remainder)
        self.keep_parent = bool(keep_parent)
        self.keep_groups = bool(keep_groups)

    def _plan(self, batch: Batch, weights: Sequence[float]) -> MixPlan:
        """The plan of ``weights`` (host floats) on ``batch``: an identity plan for a single weight, else the
        partners of the op's mode drawn from ``self.rng`` on the batch's device."""
        w = tuple(check_weights(list(weights)))
        k = len(w)
        if k == 1:
            return MixPlan.unmixed(batch.size, batch.device)
        m = batch.replicas
        if self.mode == "permute":
            rows_out = batch.size
        else:
            rows_out = group_rows(batch.size, k, self.drop_remainder) if m == 1 else batch.size // k
        # Refuse before drawing, so a failed call leaves the generator where it was.
        _refuse_patchup_plan(batch, k, rows_out)
        sources = draw_mix_sources(batch.size, k, self.mode, self.rng.get(batch.device), replicas=m,
                                   shared=self.keep_groups, drop_remainder=self.drop_remainder)
        return MixPlan.uniform(sources, w, groups=m if m > 1 and self.keep_groups else 1)

    def apply(self, batch: Batch, params: MixPlan, executor: Executor | None = None) -> Batch:
        """Mix ``batch`` with ``params`` (:func:`mix_batch`; ``executor`` computes the inputs when given): the
        same plan gives the same batch."""
        if not isinstance(params, MixPlan):
            raise TypeError(f"{type(self).__name__}.apply needs a MixPlan, got {type(params).__name__}")
        return mix_batch(batch, params, keep_parent=self.keep_parent, executor=executor)

    def mix(self, batch: Batch, executor: Executor | None = None) -> Batch:
        """Draw this batch's plan and execute it with ``executor`` (``None``: the torch reference)."""
        return self.apply(batch, self.draw(batch), executor)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "drop_remainder": self.drop_remainder, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mode = _check_mode(state["mode"])  # before the generator's state is replaced
        super().load_state_dict(state)
        self.mode, self.drop_remainder = mode, bool(state["drop_remainder"])


class SumMix(RowMixOp):
    """Sum Augmentation with ``k`` equally weighted inputs (Simionescu 2020, section 3.3).

    Group mode (default, the thesis's): the batch is split into ``k`` sum groups of ``n = N / k``
    rows and output row ``i`` is the mean of the rows at index ``i`` of every group,
    ``x~_i = (1/k) sum_{g<k} x_{g*n+i}``, its target the same mean of the one-hot targets (so a class
    present in ``m`` of the ``k`` inputs gets weight ``m / k``). The output has ``n`` rows.
    Permutation mode (ours, not in the thesis): keeps ``N`` rows, ``x~_i = (1/k)(x_i + sum_{g=1}^{k-1}
    x_{pi_g(i)})`` with ``pi_g`` random permutations of the batch — mixup-style pairing with ``k`` inputs.
    On a replicated batch the partners are copies of other seeds (see :class:`RowMixOp`).

    ``groups`` may be changed between batches (the :class:`~regpipe.engine.cascade.Cascade` controller
    does: Cascading Sum Augmentation, section 3.4, trains at ``k = 8, 4, 2, 1`` in turn).

    Args:
        groups: ``k >= 1`` (1 = the batch passes through).
        mode: ``"group"`` or ``"permute"``.
        seed: seed of the partner generator (plain group mode draws nothing).
        drop_remainder: group mode: drop the last ``N % k`` rows instead of raising.
        keep_parent: keep the unmixed rows in ``batch.mixing`` (see :func:`mix_batch`).
        keep_groups: keep a replicated batch's groups (see :class:`RowMixOp`).

    Example:
        >>> import torch
        >>> from regpipe import Batch, SumMix
        >>> batch = Batch.from_labels(torch.rand(8, 3, 4, 4), torch.arange(8) % 4, num_classes=4)
        >>> op = SumMix(groups=4)
        >>> plan = op.draw(batch)
        >>> plan.column_weights, plan.sources.tolist()
        ((0.25, 0.25, 0.25, 0.25), [[0, 2, 4, 6], [1, 3, 5, 7]])
        >>> op.apply(batch, plan).inputs.shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(self, groups: int = 2, mode: MixMode = "group", seed: int = 0, drop_remainder: bool = False,
                 keep_parent: bool = False, keep_groups: bool = False) -> None:
        super().__init__(mode, seed, drop_remainder, keep_parent, keep_groups)
        self.groups = groups

    @property
    def groups(self) -> int:
        """``k``, the number of inputs in each mixed row (settable between batches)."""
        return self._groups

    @groups.setter
    def groups(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"groups must be an integer >= 1, got {k!r}")
        self._groups = k

    def weights(self) -> list[float]:
        """The ``k`` equal weights ``1 / k``."""
        return [1.0 / self.groups] * self.groups

    def draw(self, batch: Batch) -> MixPlan:
        """The plan of equal weights: group rows, or in permutation mode ``k - 1`` partner columns from
        ``self.rng`` (copies of other seeds on a replicated batch)."""
        return self._plan(batch, self.weights())

    def state_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.groups = int(state["groups"])
        super().load_state_dict(state)


class GradualSumMix(RowMixOp):
    """Gradually Cascading Sum Augmentation (Simionescu 2020, section 3.5, eqs. 3.1-3.6).

    The batch is mixed like :class:`SumMix`, but with the Gradually Cascading Coefficients
    ``c = gcc_weights(k0, t)`` instead of equal weights: ``x~_i = sum_g c_g x_{g*n+i}`` (group mode,
    ``n = N / k0``; groups whose weight reached zero are not read) or ``x~_i = c_0 x_i + sum_{g>=1}
    c_g x_{pi_g(i)}`` (permutation mode). The progress ``t = min(step_count / gradual_steps, 1)``
    advances with :meth:`step` (call it after each optimizer step); as ``t`` goes from 0 to 1 the
    weights move continuously from the uniform ``1 / k0`` to ``(1, 0, ..., 0)``, one input fading out
    at a time (see :func:`~regpipe.functional.gcc_weights` for the formula). Once ``t == 1`` (the
    fine-tune phase) the batch passes through clean and whole.

    Args:
        k0: number of inputs mixed at ``t = 0``.
        gradual_steps: optimizer steps from ``t = 0`` to ``t = 1``.
        mode: ``"group"`` or ``"permute"``.
        seed: seed of the partner generator.
        drop_remainder: group mode: drop the last ``N % k0`` rows instead of raising.
        keep_parent: keep the unmixed rows in ``batch.mixing`` (see :func:`mix_batch`).
        keep_groups: keep a replicated batch's groups (see :class:`RowMixOp`).

    Example:
        >>> import torch
        >>> from regpipe import Batch, GradualSumMix
        >>> op = GradualSumMix(k0=4, gradual_steps=100)
        >>> batch = Batch.from_labels(torch.rand(8, 3, 4, 4), torch.arange(8) % 4, num_classes=4)
        >>> op(batch).inputs.shape, op.t
        (torch.Size([2, 3, 4, 4]), 0.0)
    """

    def __init__(self, k0: int = 4, gradual_steps: int = 1000, mode: MixMode = "group", seed: int = 0,
                 drop_remainder: bool = False, keep_parent: bool = False, keep_groups: bool = False) -> None:
        super().__init__(mode, seed, drop_remainder, keep_parent, keep_groups)
        gcc_coefficients(k0, 0.0)  # validates k0
        if isinstance(gradual_steps, bool) or not isinstance(gradual_steps, int) or gradual_steps < 1:
            raise ValueError(f"gradual_steps must be an integer >= 1, got {gradual_steps!r}")
        self.k0 = k0
        self.gradual_steps = gradual_steps
        self.step_count = 0

    @property
    def t(self) -> float:
        """Progress of the gradual phase, ``min(step_count / gradual_steps, 1)``."""
        return min(self.step_count / self.gradual_steps, 1.0)

    def weights(self) -> list[float]:
        """The ``k0`` Gradually Cascading Coefficients at the current ``t``, as host floats
        (:func:`~regpipe.functional.gcc_weights` gives them as a tensor)."""
        return gcc_coefficients(self.k0, self.t)

    def step(self) -> None:
        """Advance the schedule by one optimizer step."""
        self.step_count += 1

    def draw(self, batch: Batch) -> MixPlan:
        """The plan at the current ``t`` (an identity plan once ``t == 1``: nothing is drawn) with, in permutation
        mode or on a replicated batch, partners from ``self.rng``."""
        if self.t >= 1.0:
            return MixPlan.unmixed(batch.size, batch.device)  # fine-tune phase: nothing to draw
        return self._plan(batch, self.weights())

    def state_dict(self) -> dict[str, Any]:
        return {"k0": self.k0, "gradual_steps": self.gradual_steps, "step_count": self.step_count,
                **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k0 = int(state["k0"])
        self.gradual_steps = int(state["gradual_steps"])
        self.step_count = int(state["step_count"])
        super().load_state_dict(state)
