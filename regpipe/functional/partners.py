"""Which rows a mixing op sums: the row tables of every mixing plan, drawn on the batch's device.

One place for the partners of Sum Augmentation (Simionescu 2020, "Deep Learning Training Procedure
Augmentations", sections 3.3 and 3.5), MixUp (Zhang et al. 2018), CutMix's pairing (Yun et al. 2019) and
test-time sum augmentation (Simionescu 2020, section 3.6). Every function returns int64 row indices on the
generator's device and reads no device value on the host (no ``item``, ``unique`` or ``nonzero``), so a
mixing op costs no device synchronisation.

Replicated batches (in-batch replication, Hoffer et al. 2020; Hernández-García et al. 2019) hold ``m``
copies of each of ``S`` seeds, rows ``s * m .. s * m + m - 1`` for seed ``s`` (``Batch.replicas = m``, declared
by whoever made the copies). Mixing a copy with another copy of its own seed would mix an image with
itself, so partners are drawn at the seed level: a random arrangement of the ``S`` seeds on the device,
then copy ``j`` of each partner seed for copy ``j`` of a row's seed. ``shared=True`` draws one arrangement
for all ``m`` copies, so the copies of a seed mix with the same partner seeds: the output rows then come in
groups of ``m`` views of one mixture, which a consistency loss (invariance) compares; otherwise every copy
index draws its own arrangement and the copies of a seed meet different partners.
"""

from __future__ import annotations

import warnings

import torch

from regpipe.core.checks import check_permutations

__all__ = ["draw_mix_sources", "draw_partners", "group_rows", "mix_sources"]


def group_rows(n_rows: int, k: int, drop_remainder: bool = False) -> int:
    """Rows per sum group, ``n = N // k``, when a batch of ``N = n_rows`` rows is split into ``k`` groups.

    Group-mode Sum Augmentation (Simionescu 2020, section 3.3) needs ``k`` to divide the batch size;
    with ``drop_remainder`` the last ``N % k`` rows are left out instead.

    Args:
        n_rows: batch size ``N``.
        k: number of sum groups (``k >= 1``).
        drop_remainder: allow ``N % k != 0`` (the remainder rows are not mixed; a ``UserWarning`` says
            how many, shown once per ``(k, N)``).

    Returns:
        ``n = N // k``.

    Raises:
        ValueError: ``k < 1``, ``k > N``, or ``k`` does not divide ``N`` and ``drop_remainder`` is False.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > n_rows:
        raise ValueError(f"k={k} sum groups need at least k rows, the batch has {n_rows}")
    if n_rows % k and not drop_remainder:
        raise ValueError(f"k={k} does not divide the batch size {n_rows}; use a batch size that is a multiple "
                         f"of {k} or pass drop_remainder=True to drop the last {n_rows % k} rows")
    if n_rows % k:
        _log_dropped(k, n_rows)
    return n_rows // k


def _log_dropped(k: int, n_rows: int) -> None:
    """The opt-in drop is announced (a ``UserWarning``): nothing is left out without a word. Python's
    warning filter shows it once per batch size and ``k`` (the message names both)."""
    warnings.warn(f"drop_remainder=True: group mixing with k={k} leaves out the last {n_rows % k} of {n_rows} "
                  f"rows of every batch of {n_rows} rows", UserWarning, stacklevel=3)


def mix_sources(n_rows: int, k: int, perms: torch.Tensor | None = None, drop_remainder: bool = False,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The row table of the plain modes: output row ``i`` mixes rows ``sources[i, :]``.

    Group mode (``perms is None``): ``sources[i, g] = g * n + i`` with ``n = group_rows(n_rows, k)``.
    Permutation mode: ``sources[:, 0] = arange(n_rows)`` and ``sources[:, g] = perms[g - 1]``.

    Returns:
        ``(N_out, k)`` int64 tensor on ``perms``' device in permutation mode, else on ``device`` (default CPU).
    """
    if perms is None:
        n = group_rows(n_rows, k, drop_remainder)
        return torch.arange(k * n, device=device).view(k, n).t().contiguous()
    _check_perms(perms, n_rows, k)
    first = torch.arange(n_rows, device=perms.device).unsqueeze(0)
    return torch.cat([first, perms.long()], dim=0).t().contiguous()


def _check_perms(perms: torch.Tensor, n_rows: int, k: int, distinct: bool = True) -> None:
    if perms.shape != (k - 1, n_rows):
        raise ValueError(f"perms must have shape (k - 1, N) = ({k - 1}, {n_rows}), got {tuple(perms.shape)}")
    if perms.dtype != torch.int64:
        raise TypeError(f"perms must be int64, got {perms.dtype}")
    # Each row must be a permutation: an out-of-range index would fail inside index_select (a device-side
    # assert on CUDA), a repeated one would silently weight some rows twice and never read others.
    # Checked on host values only; the ops draw theirs with randperm on the batch's device.
    check_permutations("perms", perms, n_rows, distinct=distinct)


def _permutations(count: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``(count, n)`` int64: ``count`` independent ``randperm(n)``, drawn in order from ``generator``."""
    device = generator.device
    if count == 0:
        return torch.empty(0, n, dtype=torch.int64, device=device)
    return torch.stack([torch.randperm(n, generator=generator, device=device) for _ in range(count)])


def _seed_layout(n_rows: int, replicas: int) -> int:
    """``S``, the number of seeds of a batch of ``n_rows`` rows in groups of ``replicas`` copies."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1 or n_rows % replicas:
        raise ValueError(f"replicas must be a positive integer dividing the {n_rows} rows, got {replicas!r}")
    return n_rows // replicas


def _replica_group_sources(seeds: int, m: int, k: int, generator: torch.Generator, shared: bool) -> torch.Tensor:
    """Group mode on ``S = seeds`` seeds of ``m`` copies: ``(S m / k, k)`` rows, each copy ``j`` of ``k`` seeds.

    A random arrangement ``pi`` of the seeds is cut into ``k`` groups of ``S / k``; output row ``t * m + j`` mixes
    copy ``j`` of seeds ``pi[g S / k + t]``, ``g < k`` (``k`` different seeds; every input row read once). One
    arrangement for all copies when ``shared``, one per copy index otherwise.
    """
    if seeds % k:
        raise ValueError(f"group mixing of a replicated batch mixes k={k} different seeds per row, so k must divide "
                         f"the number of seeds: the batch of {seeds * m} rows holds S={seeds} seeds of m={m} copies; "
                         f"use a batch of a multiple of {k * m} rows or a k dividing {seeds}")
    per_group = seeds // k
    arrangement = _permutations(1 if shared else m, seeds, generator)      # (P, S)
    chosen = arrangement.view(-1, k, per_group).permute(2, 0, 1)             # (S / k, P, k) seed of (t, copy, g)
    chosen = chosen.expand(per_group, m, k)
    copies = torch.arange(m, device=generator.device).view(1, m, 1)
    return (chosen * m + copies).reshape(per_group * m, k)


def _replica_permutation_sources(seeds: int, m: int, k: int, generator: torch.Generator,
                                 shared: bool) -> torch.Tensor:
    """Permutation mode on ``S = seeds`` seeds of ``m`` copies: ``(S m, k)`` rows, column 0 the row itself.

    The seeds are put on a random cycle ``pi`` and partner ``g`` of seed ``pi[t]`` is ``pi[(t + c_g) mod S]`` for
    ``k - 1`` distinct random shifts ``c_g`` in ``1 .. S - 1``: no seed is its own partner and the ``k`` seeds
    of a row differ. Row ``s * m + j`` reads copy ``j`` of its partner seeds. One cycle for all copies when
    ``shared``, one per copy index otherwise.
    """
    if seeds < k:
        raise ValueError(f"mixing k={k} different seeds per row needs at least {k} seeds: the batch of {seeds * m} "
                         f"rows holds S={seeds} seeds of m={m} copies")
    device = generator.device
    count = 1 if shared else m
    cycle = _permutations(count, seeds, generator)                                      # (P, S)
    shifts = _permutations(count, seeds - 1, generator)[:, :k - 1] + 1                  # (P, k - 1), distinct
    position = torch.empty_like(cycle).scatter_(1, cycle, torch.arange(seeds, device=device).expand(count, seeds))
    ahead = (position.unsqueeze(2) + shifts.unsqueeze(1)) % seeds                       # (P, S, k - 1)
    partners = cycle.gather(1, ahead.reshape(count, -1)).view(count, seeds, k - 1)
    own = torch.arange(seeds, device=device).view(1, seeds, 1).expand(count, seeds, 1)
    chosen = torch.cat([own, partners], dim=2).permute(1, 0, 2).expand(seeds, m, k)     # (S, m, k)
    copies = torch.arange(m, device=device).view(1, m, 1)
    return (chosen * m + copies).reshape(seeds * m, k)


def draw_mix_sources(n_rows: int, k: int, mode: str, generator: torch.Generator | None, replicas: int = 1,
                     shared: bool = False, drop_remainder: bool = False) -> torch.Tensor:
    """The ``(N_out, k)`` int64 rows each output row of a ``k``-row mix reads, drawn on ``generator``'s device.

    * plain batch, group mode: ``sources[i, g] = g * n + i`` (:func:`mix_sources`; nothing drawn);
    * plain batch, permutation mode: ``[i, pi_1(i), ..., pi_{k-1}(i)]`` with ``k - 1`` draws of ``randperm(N)``
      (a row may meet itself, as in MixUp's own pairing);
    * replicated batch (``replicas = m > 1``): partners of other seeds, drawn at the seed level (module
      docstring); group mode needs ``k`` to divide the number of seeds ``S = N / m``, permutation mode
      ``S >= k``.

    Args:
        n_rows: batch size ``N``.
        k: rows per output row (``>= 2``).
        mode: ``"group"`` (``N / k`` output rows) or ``"permute"`` (``N`` output rows).
        generator: the op's generator, on the batch's device (plain group mode draws nothing from it and only
            takes its device; ``None`` there gives a CPU table).
        replicas: ``m``, copies per seed (``Batch.replicas``).
        shared: replicated batch: the ``m`` copies of a seed mix with the same partner seeds.
        drop_remainder: plain group mode: drop the last ``N % k`` rows instead of raising.

    Raises:
        ValueError: a bad mode or ``k``; ``k`` not dividing ``N`` (plain group mode, without
            ``drop_remainder``) or the seeds (replicated group mode), or fewer than ``k`` seeds (named).
    """
    if mode not in ("group", "permute"):
        raise ValueError(f"mode must be 'group' or 'permute', got {mode!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"a mix reads k >= 2 rows, got k={k!r}")
    seeds = _seed_layout(n_rows, replicas)
    if replicas == 1 and mode == "group":
        return mix_sources(n_rows, k, drop_remainder=drop_remainder,
                           device=generator.device if generator is not None else None)
    if generator is None:
        raise ValueError(f"{mode} mode on {'a replicated' if replicas > 1 else 'a'} batch draws partners: give the "
                         "op's generator")
    if replicas == 1:
        return mix_sources(n_rows, k, _permutations(k - 1, n_rows, generator))
    if mode == "group":
        return _replica_group_sources(seeds, replicas, k, generator, shared)
    return _replica_permutation_sources(seeds, replicas, k, generator, shared)


def draw_partners(draws: int, n: int, k: int, generator: torch.Generator, pool_size: int | None = None,
                  replicas: int = 1) -> torch.Tensor:
    """``(draws, n, k - 1)`` int64 random partner indices for test-time sum augmentation, on ``generator``'s device.

    From the batch itself (``pool_size=None``) a row never draws a row of its own seed: indices are drawn
    uniformly from the ``n - m`` rows of the other seeds (``m = replicas``; ``m = 1``: every row but itself),
    with replacement. From a reference pool any of its ``pool_size`` rows may be drawn.

    Raises:
        ValueError: fewer than 2 seeds without a pool, or an empty pool.
    """
    device = generator.device
    if pool_size is not None:
        if pool_size < 1:
            raise ValueError("the reference pool is empty")
        return torch.randint(0, pool_size, (draws, n, k - 1), generator=generator, device=device)
    seeds = _seed_layout(n, replicas)
    if seeds < 2:
        raise ValueError(f"test-time sum augmentation within the batch needs >= 2 seeds, got {seeds} "
                         f"({n} rows, {replicas} per seed)")
    idx = torch.randint(0, n - replicas, (draws, n, k - 1), generator=generator, device=device)
    own_start = (torch.arange(n, device=device) // replicas * replicas).view(1, n, 1)
    return idx + (idx >= own_start).long() * replicas  # skip the rows of the row's own seed
