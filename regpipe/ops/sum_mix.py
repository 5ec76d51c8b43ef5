"""Sum Augmentation ops: draw the mixing parameters, then call :func:`regpipe.functional.sum_mix`.

Sum Augmentation, Cascading and Gradually Cascading Sum Augmentation are from C. Simionescu, *Deep
Learning Training Procedure Augmentations* (MSc thesis, Alexandru Ioan Cuza University, 2020;
arXiv:2211.14395), chapter 3. Both ops follow the op contract (:class:`~regpipe.core.op.BatchOp`):
``draw(batch)`` returns a frozen :class:`MixParams`, ``apply(batch, params)`` mixes deterministically.

A batch that carries a PatchUp plan cannot be mixed: the plan pairs the rows of the batch as it was
given, so draw PatchUp after mixing (:func:`mix_batch` raises ``ValueError`` otherwise).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from regpipe.core.batch import Batch, MixRecord
from regpipe.core.op import BatchOp
from regpipe.functional.sum_mix import check_weights, gcc_weights, group_rows, mix_sources, sum_mix

__all__ = ["GradualSumMix", "MixParams", "SumMix", "SumMixOp", "across_seed_sources", "mix_batch", "params_sources",
           "set_uint8_mixer"]

#: ``(x uint8, sources, weights, mean, std, out_dtype=, memory_format=) -> mixed`` set by ``regpipe.loaders`` to
#: the fused kernel (:func:`regpipe.kernels.fused_mix`); ``None``: the torch composite below.
_UINT8_MIXER: Callable[..., torch.Tensor] | None = None


def set_uint8_mixer(mixer: Callable[..., torch.Tensor] | None) -> None:
    """Install the implementation :func:`mix_batch` uses for uint8 inputs (``regpipe.loaders`` installs the fused
    kernel :func:`regpipe.kernels.fused_mix`; ``None`` restores the torch composite). Both compute
    ``sum_g w_g x[sources[:, g]]`` in float32 from the uint8 values (0..255, as :func:`sum_mix`)."""
    global _UINT8_MIXER
    _UINT8_MIXER = mixer

MixMode = Literal["group", "permute"]


@dataclass(frozen=True)
class MixParams:
    """Every choice of one Sum Augmentation step.

    Attributes:
        weights: the ``k`` mixing weights ``c_0 .. c_{k-1}`` as host floats (non-negative, summing to
            1; a tensor or list is converted). The schedule position of :class:`GradualSumMix` is baked
            in, so replaying the params needs no op state.
        perms: ``(k - 1, N)`` int64 partner permutations on the batch's device (permutation mode), or
            ``None`` (group mode, which draws nothing).
        sources: ``(N_out, k)`` int64 rows each output row mixes, drawn across seeds for a replicated batch
            (:func:`across_seed_sources`), or ``None``. Exclusive with ``perms``.

    Raises:
        ValueError: weights that :func:`~regpipe.functional.check_weights` rejects, or ``perms`` that
            are not 2-D with ``k - 1`` rows.
        TypeError: ``perms`` that are not an int64 tensor.
    """

    weights: tuple[float, ...]
    perms: torch.Tensor | None = None
    sources: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Normalise to host floats once, so `apply` never synchronises on a device tensor.
        object.__setattr__(self, "weights", tuple(check_weights(self.weights)))
        if self.sources is not None:
            if self.perms is not None:
                raise ValueError("MixParams takes perms or sources, not both")
            if not isinstance(self.sources, torch.Tensor) or self.sources.dtype != torch.int64 \
                    or self.sources.dim() != 2 or self.sources.shape[1] != self.k:
                raise ValueError(f"MixParams.sources must be an (N_out, k) = (N_out, {self.k}) int64 tensor, got "
                                 f"{getattr(self.sources, 'dtype', type(self.sources).__name__)} "
                                 f"{tuple(getattr(self.sources, 'shape', ()))}")
        if self.perms is not None:
            if not isinstance(self.perms, torch.Tensor) or self.perms.dtype != torch.int64:
                raise TypeError(f"MixParams.perms must be an int64 tensor, got "
                                f"{getattr(self.perms, 'dtype', type(self.perms).__name__)}")
            if self.perms.dim() != 2 or self.perms.shape[0] != self.k - 1:
                raise ValueError(f"MixParams.perms must be (k - 1, N) = ({self.k - 1}, N) for {self.k} weights, "
                                 f"got shape {tuple(self.perms.shape)}")

    @property
    def k(self) -> int:
        """Number of inputs mixed into each output row."""
        return len(self.weights)


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


def mix_batch(batch: Batch, weights: torch.Tensor | list[float] | tuple[float, ...],
              perms: torch.Tensor | None = None, drop_remainder: bool = False, keep_parent: bool = False,
              sources: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> Batch:
    """Apply :func:`~regpipe.functional.sum_mix` to a whole :class:`Batch`, recording the mix in ``batch.mixing``.

    Output row ``i`` is ``sum_g c_g * x[s_{i,g}]`` (targets alike, weights added per class), with
    ``s_{i,g} = g * n + i`` in group mode (``perms=None``, ``n = N / k`` output rows) and
    ``s_{i,0} = i``, ``s_{i,g} = perms[g - 1, i]`` in permutation mode (``N`` output rows). The output's
    ``source_ids``, ``affine`` and ``photometric`` are those of each row's first component ``s_{i,0}``
    (mixing is neither geometric nor photometric); ``mixing`` holds all components.

    With a single weight of 1 the batch is returned as it is (nothing to mix).

    Args:
        batch: ``N`` rows, no PatchUp plan.
        weights: ``(k,)`` non-negative weights summing to 1.
        perms: ``(k - 1, N)`` int64 permutations (permutation mode) or ``None`` (group mode).
        drop_remainder: group mode: drop the last ``N % k`` rows instead of raising.
        keep_parent: record the unmixed inputs and targets in the :class:`MixRecord` (a reference, not a
            copy: it keeps the pre-mix batch alive as long as the mixed one), for losses that compare a
            mixed row with its components (the saliency consistency loss).
        sources: ``(N_out, k)`` int64 rows of each output row (any table, e.g. :func:`across_seed_sources`;
            exclusive with ``perms``): ``s_{i,g} = sources[i, g]``.
        inputs: the mixed inputs when the caller computed them (the loaders' fused stage, which normalises
            while mixing); else they are computed here. uint8 inputs are mixed by the installed fused kernel
            (:func:`set_uint8_mixer`) or the torch composite, in float32 0..255 as :func:`sum_mix`.

    Returns:
        The mixed batch, ``N / k`` (group) or ``N`` (permutation) rows, with a :class:`MixRecord`.

    Raises:
        ValueError: bad weights or perms, ``k`` not dividing ``N`` in group mode (without
            ``drop_remainder``), or a batch carrying a PatchUp plan.
    """
    w = check_weights(weights)
    k = len(w)
    if k == 1:
        return batch
    if sources is not None and perms is not None:
        raise ValueError("give perms or sources, not both")
    table_given = sources is not None
    table = sources if table_given else mix_sources(batch.size, k, perms, drop_remainder)
    sources = table.to(batch.device)
    n_out = sources.shape[0]
    _refuse_patchup_plan(batch, k, n_out)
    if sources.shape[1] != k:
        raise ValueError(f"sources has {sources.shape[1]} columns for {k} weights")
    if inputs is None and batch.inputs.dtype == torch.uint8:
        inputs = _mix_uint8(batch.inputs, sources, w)
    elif inputs is None and table_given:
        inputs = _gather_sum(batch.inputs, sources, w, batch.inputs.dtype)
    if inputs is not None:
        targets = _gather_sum(batch.targets, sources, w, batch.targets.dtype)
    else:
        inputs, targets = sum_mix(batch.inputs, batch.targets, w, perms=perms, drop_remainder=drop_remainder)
    weight_table = torch.tensor(w, dtype=torch.float32, device=batch.device).expand(n_out, k)
    record = MixRecord(sources=sources, weights=weight_table, source_ids=batch.source_ids[sources],
                       parent_inputs=batch.inputs if keep_parent else None,
                       parent_targets=batch.targets if keep_parent else None)
    first = sources[:, 0]
    return Batch(inputs=inputs, targets=targets, source_ids=batch.source_ids[first], affine=batch.affine[first],
                 mixing=record, photometric=None if batch.photometric is None else batch.photometric[first])


def _gather_sum(x: torch.Tensor, sources: torch.Tensor, weights: list[float], dtype: torch.dtype) -> torch.Tensor:
    """``sum_{g: w_g != 0} w_g * x[sources[:, g]]`` in ``dtype`` (the memory format of ``x`` is kept)."""
    out = None
    for g, wg in enumerate(weights):
        if wg == 0.0:
            continue
        part = x.index_select(0, sources[:, g]).to(dtype).mul_(wg)
        out = part if out is None else out.add_(part)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _mix_uint8(x: torch.Tensor, sources: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """uint8 rows mixed in float32 0..255 (as :func:`sum_mix`): the installed fused kernel, else the torch composite."""
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    if _UINT8_MIXER is not None and x.dim() == 4:
        c = x.shape[1]
        return _UINT8_MIXER(x, sources, weights, [0.0] * c, [1.0 / 255.0] * c, out_dtype=torch.float32,
                            memory_format=fmt)
    return _gather_sum(x, sources, weights, torch.float32)


def params_sources(params: "MixParams", n_rows: int, drop_remainder: bool = False) -> torch.Tensor:
    """The ``(N_out, k)`` row table a :class:`MixParams` mixes on a batch of ``n_rows`` rows (group mode
    ``g * n + i``, permutation mode ``[i, perms[:, i]]``, or its own ``sources``)."""
    if params.sources is not None:
        return params.sources
    return mix_sources(n_rows, params.k, params.perms, drop_remainder)


def across_seed_sources(seed_ids: torch.Tensor, k: int, n_out: int, permute: bool,
                        rng: np.random.Generator, max_sweeps: int = 200) -> torch.Tensor:
    """Mixing partners for a replicated batch: ``(N_out, k)`` rows whose ``k`` components come from ``k``
    different seeds, no two output rows mixing the same set of seeds.

    After in-batch replication (Hoffer et al. 2020; Hernández-García et al. 2019) a batch holds ``m``
    copies of each of ``S`` seeds, seed-contiguous. Group-mode Sum Augmentation (Simionescu 2020,
    section 3.3) pairs row ``i`` with rows ``g n + i``, so the ``m`` copies of a seed meet the copies of
    the same partner seeds (``S = 16, m = 4, k = 4``: 16 rows from 4 seed combinations), and a
    permutation may pair a copy with its own seed. Here: group mode starts from the seeds in random
    order, seed-major, split into ``k`` groups of ``N_out`` (so the ``m <= N_out`` copies of a seed fall in
    different output rows), each group in its own random row order (so runs of copies do not line up
    into repeated seed sets), permutation mode from ``k - 1`` random permutations after the identity
    column. Conflicts (output rows with a repeated seed, plus repeated seed sets) are then few; random
    swaps (any two cells in group mode, which keeps every row used once; two rows of one partner column
    in permutation mode, which keeps each column a permutation) are kept when they do not increase their
    number, until none is left.

    Args:
        seed_ids: ``(N,)`` int64 seed id of each row.
        k: components per output row.
        n_out: output rows (``N // k`` in group mode, ``N`` in permutation mode).
        permute: permutation mode (column 0 is the identity).
        rng: numpy generator (seeded from the op's generator).
        max_sweeps: at most ``max_sweeps * N_out`` swaps are tried.

    Returns:
        ``(N_out, k)`` int64 CPU tensor.

    Raises:
        ValueError: the batch cannot allow it: fewer than ``k`` distinct seeds, or (group mode) a seed with
            more copies than output rows (named); or the search did not remove every conflict.
    """
    seeds = seed_ids.detach().cpu().numpy().astype(np.int64)
    n = seeds.shape[0]
    values, inverse, copies = np.unique(seeds, return_inverse=True, return_counts=True)
    if len(values) < k:
        raise ValueError(f"mixing k={k} rows of different seeds needs at least {k} seeds, the batch has {len(values)}")
    if not permute and int(copies.max()) > n_out:
        raise ValueError(f"seed {int(values[copies.argmax()])} has {int(copies.max())} copies for {n_out} output rows: "
                         "two would share a row; use fewer copies or a smaller k")
    if permute:
        table = np.empty((n_out, k), dtype=np.int64)
        table[:, 0] = np.arange(n)
        for g in range(1, k):
            table[:, g] = rng.permutation(n)
    else:
        rank = rng.permutation(len(values))[inverse]  # seeds in random order, copies of a seed together
        order = np.lexsort((rng.random(n), rank))
        table = order[:n_out * k].reshape(k, n_out).T.copy()
        for g in range(1, k):  # each group in its own row order: aligned runs of seeds would repeat a seed set
            table[:, g] = table[rng.permutation(n_out), g]
    group = inverse[table]  # seed index of every cell
    few_sets = math.comb(len(values), k) < n_out
    if few_sets:  # fewer seed sets than rows: only the seeds within a row must differ
        warnings.warn(f"{len(values)} seeds give only {math.comb(len(values), k)} sets of k={k} for {n_out} mixed "
                      "rows: some rows repeat a set of seeds", stacklevel=3)

    def key(o: int) -> tuple[int, ...]:
        return (o,) if few_sets else tuple(sorted(group[o].tolist()))

    def repeated(o: int) -> int:
        return int(len(set(group[o].tolist())) < k)

    keys = [key(o) for o in range(n_out)]
    reps = [repeated(o) for o in range(n_out)]
    counts = Counter(keys)
    conflicts = sum(reps) + sum(c - 1 for c in counts.values())
    first = 1 if permute else 0

    def swap(o: int, g: int, o2: int, g2: int) -> None:
        table[o, g], table[o2, g2] = table[o2, g2], table[o, g]
        group[o, g], group[o2, g2] = group[o2, g2], group[o, g]
        for row in (o, o2):
            counts[keys[row]] -= 1
            keys[row], reps[row] = key(row), repeated(row)
            counts[keys[row]] += 1

    for _ in range(max_sweeps * n_out):
        if conflicts == 0:
            break
        o = -1
        while o < 0:  # a row in conflict, by rejection (conflicts are few), from draws made 64 at a time
            o = next((int(r) for r in rng.integers(n_out, size=64) if reps[r] or counts[keys[r]] > 1), -1)
        g = int(rng.integers(first, k))
        o2 = int(rng.integers(n_out - 1))
        o2 += o2 >= o
        g2 = g if permute else int(rng.integers(k))
        old_keys, before = [keys[o], keys[o2]], reps[o] + reps[o2]
        swap(o, g, o2, g2)
        new_keys = [keys[o], keys[o2]]
        affected = set(old_keys + new_keys)
        # a key's count before the swap: now, less the rows that took it, plus the rows that left it
        before += sum(max(counts[x] - new_keys.count(x) + old_keys.count(x) - 1, 0) for x in affected)
        after = reps[o] + reps[o2] + sum(max(counts[x] - 1, 0) for x in affected)
        if after <= before:
            conflicts += after - before
        else:
            swap(o, g, o2, g2)  # undo
    if conflicts:
        raise ValueError(f"could not draw {n_out} distinct mixtures of {k} different seeds from {len(values)} seeds "
                         f"x {int(copies.max())} copies ({conflicts} conflicts left)")
    return torch.from_numpy(table)


def _draw_perms(k: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``(k - 1, n)`` int64: one ``randperm(n)`` per partner, drawn in order from ``generator``."""
    if k == 1:
        return torch.empty(0, n, dtype=torch.int64, device=generator.device)
    return torch.stack([torch.randperm(n, generator=generator, device=generator.device) for _ in range(k - 1)])


def _check_mode(mode: str) -> MixMode:
    if mode not in ("group", "permute"):
        raise ValueError(f"mode must be 'group' or 'permute', got {mode!r}")
    return mode  # type: ignore[return-value]


class _SumMixBase(BatchOp[MixParams]):
    """What both sum-mixing ops share: the mode, ``drop_remainder``, and drawing/applying :class:`MixParams`."""

    def __init__(self, mode: MixMode, seed: int, drop_remainder: bool, keep_parent: bool) -> None:
        super().__init__(seed)
        self.mode: MixMode = _check_mode(mode)
        self.drop_remainder = bool(drop_remainder)
        self.keep_parent = bool(keep_parent)

    def _draw(self, batch: Batch, weights: torch.Tensor | list[float]) -> MixParams:
        w = check_weights(weights)
        if len(w) > 1 and batch.mixing is None:
            ids = batch.source_ids.detach().cpu()
            if torch.unique(ids).numel() < ids.numel():  # replicated: partners across seeds
                n_out = group_rows(batch.size, len(w), self.drop_remainder) if self.mode == "group" else batch.size
                _refuse_patchup_plan(batch, len(w), n_out)
                generator = self.rng.get(batch.device)
                seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
                return MixParams(tuple(w), sources=across_seed_sources(ids, len(w), n_out, self.mode == "permute",
                                                                       np.random.default_rng(seed)))
        if self.mode == "group" or len(w) == 1:
            return MixParams(tuple(w))  # group mode has no random choice
        # Refuse before drawing, so a failed call leaves the generator where it was.
        _refuse_patchup_plan(batch, len(w), batch.size)
        return MixParams(tuple(w), _draw_perms(len(w), batch.size, self.rng.get(batch.device)))

    def apply(self, batch: Batch, params: MixParams) -> Batch:
        """Mix ``batch`` with ``params`` (:func:`mix_batch`): the same params give the same batch."""
        if not isinstance(params, MixParams):
            raise TypeError(f"{type(self).__name__}.apply needs MixParams, got {type(params).__name__}")
        return mix_batch(batch, params.weights, perms=params.perms, drop_remainder=self.drop_remainder,
                         keep_parent=self.keep_parent, sources=params.sources)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "drop_remainder": self.drop_remainder, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mode = state["mode"]
        if mode not in ("group", "permute"):
            raise ValueError(f"state has an unknown mode {mode!r}")
        super().load_state_dict(state)
        self.mode, self.drop_remainder = mode, bool(state["drop_remainder"])


SumMixOp = _SumMixBase  # what the loaders' fused stage recognises: SumMix and GradualSumMix


class SumMix(_SumMixBase):
    """Sum Augmentation with ``k`` equally weighted inputs (Simionescu 2020, section 3.3).

    Group mode (default, the thesis's): the batch is split into ``k`` sum groups of ``n = N / k``
    rows and output row ``i`` is the mean of the rows at index ``i`` of every group,
    ``x~_i = (1/k) sum_{g<k} x_{g*n+i}``, its target the same mean of the one-hot targets (so a class
    present in ``m`` of the ``k`` inputs gets weight ``m / k``). The output has ``n`` rows.
    Permutation mode (ours, not in the thesis): keeps ``N`` rows, ``x~_i = (1/k)(x_i + sum_{g=1}^{k-1}
    x_{pi_g(i)})`` with ``pi_g`` random permutations of the batch — mixup-style pairing with ``k`` inputs.

    ``groups`` may be changed between batches (the :class:`~regpipe.engine.cascade.Cascade` controller
    does: Cascading Sum Augmentation, section 3.4, trains at ``k = 8, 4, 2, 1`` in turn).

    Args:
        groups: ``k >= 1`` (1 = the batch passes through).
        mode: ``"group"`` or ``"permute"``.
        seed: seed of the permutation generator (permutation mode; group mode draws nothing).
        drop_remainder: group mode: drop the last ``N % k`` rows instead of raising.
        keep_parent: keep the unmixed rows in ``batch.mixing`` (see :func:`mix_batch`).

    Example:
        >>> import torch
        >>> from regpipe import Batch, SumMix
        >>> batch = Batch.from_labels(torch.rand(8, 3, 4, 4), torch.arange(8) % 4, num_classes=4)
        >>> op = SumMix(groups=4)
        >>> params = op.draw(batch)
        >>> params.weights, params.perms
        ((0.25, 0.25, 0.25, 0.25), None)
        >>> op.apply(batch, params).inputs.shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(self, groups: int = 2, mode: MixMode = "group", seed: int = 0, drop_remainder: bool = False,
                 keep_parent: bool = False) -> None:
        super().__init__(mode, seed, drop_remainder, keep_parent)
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

    def draw(self, batch: Batch) -> MixParams:
        """Equal weights, and in permutation mode ``k - 1`` permutations of ``batch``'s rows from ``self.rng``."""
        return self._draw(batch, self.weights())

    def state_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.groups = int(state["groups"])
        super().load_state_dict(state)


class GradualSumMix(_SumMixBase):
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
        seed: seed of the permutation generator (permutation mode).
        drop_remainder: group mode: drop the last ``N % k0`` rows instead of raising.
        keep_parent: keep the unmixed rows in ``batch.mixing`` (see :func:`mix_batch`).

    Example:
        >>> import torch
        >>> from regpipe import Batch, GradualSumMix
        >>> op = GradualSumMix(k0=4, gradual_steps=100)
        >>> batch = Batch.from_labels(torch.rand(8, 3, 4, 4), torch.arange(8) % 4, num_classes=4)
        >>> op(batch).inputs.shape, op.t
        (torch.Size([2, 3, 4, 4]), 0.0)
    """

    def __init__(self, k0: int = 4, gradual_steps: int = 1000, mode: MixMode = "group", seed: int = 0,
                 drop_remainder: bool = False, keep_parent: bool = False) -> None:
        super().__init__(mode, seed, drop_remainder, keep_parent)
        gcc_weights(k0, 0.0)  # validates k0
        if isinstance(gradual_steps, bool) or not isinstance(gradual_steps, int) or gradual_steps < 1:
            raise ValueError(f"gradual_steps must be an integer >= 1, got {gradual_steps!r}")
        self.k0 = k0
        self.gradual_steps = gradual_steps
        self.step_count = 0

    @property
    def t(self) -> float:
        """Progress of the gradual phase, ``min(step_count / gradual_steps, 1)``."""
        return min(self.step_count / self.gradual_steps, 1.0)

    def weights(self) -> torch.Tensor:
        """``(k0,)`` float32 Gradually Cascading Coefficients at the current ``t``."""
        return gcc_weights(self.k0, self.t)

    def step(self) -> None:
        """Advance the schedule by one optimizer step."""
        self.step_count += 1

    def draw(self, batch: Batch) -> MixParams:
        """The weights at the current ``t`` (``(1.0,)``, i.e. no mixing, once ``t == 1``) and, in permutation
        mode, ``k0 - 1`` permutations from ``self.rng``."""
        if self.t >= 1.0:
            return MixParams((1.0,))  # fine-tune phase: nothing to draw
        return self._draw(batch, self.weights())

    def state_dict(self) -> dict[str, Any]:
        return {"k0": self.k0, "gradual_steps": self.gradual_steps, "step_count": self.step_count,
                **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k0 = int(state["k0"])
        self.gradual_steps = int(state["gradual_steps"])
        self.step_count = int(state["step_count"])
        super().load_state_dict(state)
