"""Sample loss orderer and sampler: batches chosen by each sample's current loss.

The Sample Loss Orderer & Sampler of the Perfect Ordering Approximation (Simionescu, "Deep Learning
Training Procedure Augmentations", 2020, section 2.4.1, in the vocabulary of section 2.3): the
*scoring mechanism* gives every sample its current loss, ``score(i) = L(f_theta(x_i), y_i)`` (a forward
pass, no gradient); the *ordering strategy* sorts the scored samples ascending or descending and hands
out the first unused ones; the *sampler strategy* draws samples with replacement, with probability
proportional to the score or to its inverse::

    P(i) = score(i) / sum_j score(j)                          ("direct")
    P(i) = w_i / sum_j w_j,   w_i = 1 / (score(i) + eps)      ("inverse")

The thesis's data loader rescores after every gradient step, over randomly chosen candidates only;
here the candidate pool has ``pool_size`` samples and is rescored every ``rescore_every`` batches.

Both are ``torch.utils.data.Sampler`` s yielding lists of dataset indices, for a DataLoader's
``batch_sampler``::

    sampler = LossOrderer(arrays, model, batch_size=64, order="descending")
    loader = TorchLoader(DataLoader(ArrayDataset(arrays), batch_sampler=sampler), num_classes=10)

At each rescoring the sampler draws a random candidate pool, computes every candidate's loss with a
forward pass only (``torch.no_grad()``), and then

* :class:`LossOrderer` (an *ordering strategy*) sorts the pool ascending or descending and hands out
  the first ``batch_size`` unused items; the rest of the pool stays unused, so every item is used
  once per epoch;
* :class:`LossSampler` (a *sampler strategy*) draws ``batch_size`` items from the pool with
  replacement, with probability proportional to the score (``"direct"``) or to its inverse
  (``"inverse"``).

Scores are computed **(ours)** in eval mode by default (BatchNorm running statistics: a sample's
score does not depend on which other samples share its scoring chunk); ``score_mode="train"``
scores in train mode with batch statistics of each chunk of ``eval_batch_size`` rows and leaves the
running statistics untouched. Either way the model's modes are restored. Scoring runs in the process
that iterates the sampler (the DataLoader's main process): with workers, the loader prefetches a few
batches ahead, so scores can be that many steps old.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from regpipe.core.batch import Batch, labels_to_targets
from regpipe.sampler.snapshot import frozen_running_stats

__all__ = ["LossOrderer", "LossSampler", "PlainBatch", "per_sample_cross_entropy", "sample_losses"]

Prepare = Callable[[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], Batch]
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy per row: logits ``(N, K)``, targets ``(N, K)`` -> ``(N,)`` float32."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


class PlainBatch:
    """The default ``prepare``: ``(images, labels, indices)`` -> :class:`Batch` on ``device``, no ops.

    uint8 images become float in ``0..1`` (``x / 255``), float images pass as they are; labels become
    one-hot ``(n, num_classes)`` targets and ``indices`` the source ids. (What a ``TorchLoader`` without
    mean/std builds; pass ``prepare=loader.to_batch`` for a loader's normalisation.)
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        self.num_classes, self.device = num_classes, torch.device(device)

    def __call__(self, item: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Batch:
        images, labels, indices = item
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        x = images.to(self.device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        targets = labels_to_targets(torch.as_tensor(labels), self.num_classes)
        return Batch(inputs=x, targets=targets.to(self.device),
                     source_ids=torch.as_tensor(indices).long().to(self.device))


def _fetch(data: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images (n, C, H, W), labels (n,), indices (n,))`` of ``data`` at ``indices``."""
    if hasattr(data, "images") and hasattr(data, "labels"):  # ImageArrays-like
        return data.images[indices], data.labels[indices], indices
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0][indices], data[1][indices], indices
    items = data.__getitems__(indices.tolist()) if hasattr(data, "__getitems__") else [data[int(i)] for i in indices]
    images = torch.stack([torch.as_tensor(item[0]) for item in items])
    labels = torch.stack([torch.as_tensor(item[1]) for item in items]).long()
    return images, labels, indices


def sample_losses(model: nn.Module, data: Any, indices: torch.Tensor, prepare: Prepare,
                  loss_fn: PerSampleLoss = per_sample_cross_entropy, score_mode: Literal["eval", "train"] = "eval",
                  eval_batch_size: int = 1024) -> torch.Tensor:
    """Per-sample losses of ``data`` at ``indices`` (the scoring mechanism), forward only.

    Args:
        model: the model; its modes are restored afterwards.
        data: ``ImageArrays``-like (``images``, ``labels``), a pair ``(images, labels)`` of tensors, or
            an indexable dataset of ``(image, label[, index])``.
        indices: ``(n,)`` int64 dataset indices.
        prepare: ``(images, labels, indices) -> Batch`` on the model's device (normalisation).
        loss_fn: ``(logits (m, K), targets (m, K)) -> (m,)`` per-sample losses.
        score_mode: ``"eval"`` (running statistics) or ``"train"`` (batch statistics per chunk, running
            statistics untouched).
        eval_batch_size: rows per forward pass.

    Returns:
        ``(n,)`` float32 CPU tensor.
    """
    if score_mode not in ("eval", "train"):
        raise ValueError(f"score_mode must be 'eval' or 'train', got {score_mode!r}")
    modes = [(m, m.training) for m in model.modules()]
    out = []
    try:
        model.train(score_mode == "train")
        with torch.no_grad(), (frozen_running_stats(model) if score_mode == "train" else contextlib.nullcontext()):
            for chunk in indices.split(eval_batch_size):
                batch = prepare(_fetch(data, chunk))
                logits = model(batch.inputs)
                if logits.dim() != 2 or logits.shape != batch.targets.shape:
                    raise ValueError(f"the model returns logits of shape {tuple(logits.shape)} but the targets are "
                                     f"{tuple(batch.targets.shape)} ({batch.targets.shape[1]} classes): "
                                     "num_classes does not match the model's outputs")
                losses = loss_fn(logits, batch.targets)
                if losses.shape != (chunk.numel(),):
                    raise ValueError(f"loss_fn must return per-sample losses of shape ({chunk.numel()},), "
                                     f"got {tuple(losses.shape)}")
                out.append(losses.float().cpu())
    finally:
        for m, training in modes:
            m.training = training
    return torch.cat(out) if out else torch.zeros(0)


class _SampleLossBase(Sampler[list[int]]):
    """Shared machinery: data access, scoring, generator, rescoring interval, state."""

    def __init__(self, data: Any, model: nn.Module, batch_size: int, pool_size: int | None = None, *,
                 num_classes: int | None = None, prepare: Prepare | None = None,
                 loss_fn: PerSampleLoss = per_sample_cross_entropy, score_mode: Literal["eval", "train"] = "eval",
                 eval_batch_size: int = 1024, rescore_every: int = 1, seed: int = 0) -> None:
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("rescore_every", rescore_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        pool_size = 4 * batch_size if pool_size is None else pool_size
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be an int >= 1, got {pool_size!r}")
        if score_mode not in ("eval", "train"):
            raise ValueError(f"score_mode must be 'eval' or 'train', got {score_mode!r}")
        self.size = len(data[0]) if isinstance(data, (tuple, list)) else len(data)
        if self.size < 1:
            raise ValueError("the dataset is empty")
        known = getattr(data, "num_classes", None)
        if num_classes is not None and known is not None and int(num_classes) != int(known):
            raise ValueError(f"num_classes={num_classes!r} differs from the data's num_classes={known}")
        if prepare is None:
            num_classes = known if known is not None else num_classes
            if num_classes is None:
                raise ValueError("num_classes is needed to build targets (or pass prepare=)")
            prepare = PlainBatch(int(num_classes), next(model.parameters()).device)
        self.data, self.model, self.prepare, self.loss_fn = data, model, prepare, loss_fn
        self.batch_size, self.pool_size, self.score_mode = batch_size, pool_size, score_mode
        self.eval_batch_size, self.rescore_every, self.seed = eval_batch_size, rescore_every, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.last_scores: torch.Tensor | None = None
        self.last_pool: torch.Tensor | None = None

    def score(self, indices: torch.Tensor) -> torch.Tensor:
        """Current per-sample losses at ``indices`` ``(n,)`` -> ``(n,)`` float32 (kept in ``last_scores``)."""
        scores = sample_losses(self.model, self.data, indices, self.prepare, self.loss_fn, self.score_mode,
                               self.eval_batch_size)
        self.last_pool, self.last_scores = indices, scores
        return scores

    def state_dict(self) -> dict[str, Any]:
        """Epoch counter and generator state; a run resumed from a mid-epoch checkpoint starts the next epoch."""
        return {"epoch": self.epoch, "seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
        self.generator.set_state(state["generator"])


class LossOrderer(_SampleLossBase):
    """Ordering strategy over per-sample losses (Simionescu 2020, section 2.4.1); every item once per epoch.

    The epoch's items are queued in a random order (``randperm`` from the seeded generator). At each
    rescoring the first ``pool_size`` queued items are scored; the next ``rescore_every`` batches are
    the ``batch_size`` best-ranked unused items of that pool (``order="descending"``: highest loss
    first). Unused pool items keep their queue place. The last batch is smaller unless ``drop_last``.

    Args:
        data, model, batch_size, pool_size (default ``4 * batch_size``), num_classes, prepare, loss_fn,
            score_mode, eval_batch_size, rescore_every, seed: see the module docstring and
            :func:`sample_losses`.
        order: ``"ascending"`` or ``"descending"``.
        drop_last: drop the last incomplete batch.

    Yields:
        lists of ``batch_size`` dataset indices (Python ints).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader
        >>> from regpipe.engine.data import ArrayDataset, ImageArrays
        >>> from regpipe.sampler import LossOrderer
        >>> arrays = ImageArrays(torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8), torch.arange(10) % 2,
        ...                      2, ("a", "b"))
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
        >>> sampler = LossOrderer(arrays, model, batch_size=4, order="descending")
        >>> batches = [idx.tolist() for _, _, idx in DataLoader(ArrayDataset(arrays), batch_sampler=sampler)]
        >>> [len(b) for b in batches], sorted(sum(batches, []))
        ([4, 4, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """

    def __init__(self, data: Any, model: nn.Module, batch_size: int, pool_size: int | None = None, *,
                 order: Literal["ascending", "descending"] = "descending", drop_last: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(data, model, batch_size, pool_size, **kwargs)
        if self.pool_size < batch_size:  # the ordering hands out batch_size items of one pool
            raise ValueError(f"pool_size must be an int >= batch_size={batch_size}, got {pool_size!r}")
        if order not in ("ascending", "descending"):
            raise ValueError(f"order must be 'ascending' or 'descending', got {order!r}")
        self.order, self.drop_last = order, drop_last

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        self.epoch += 1
        queue = torch.randperm(self.size, generator=self.generator).tolist()
        ranked: list[int] = []
        since = 0
        for _ in range(len(self)):
            if since % self.rescore_every == 0 or len(ranked) < min(self.batch_size, len(queue)):
                pool = torch.tensor(queue[:self.pool_size], dtype=torch.int64)
                scores = self.score(pool)
                # non-finite losses go last in either order (they carry no ranking information)
                key = torch.where(torch.isfinite(scores), scores if self.order == "ascending" else -scores,
                                  torch.full_like(scores, math.inf))
                ranked = pool[torch.sort(key, stable=True).indices].tolist()
                since = 0
            batch, ranked = ranked[:self.batch_size], ranked[self.batch_size:]
            chosen = set(batch)
            # chosen items all sit in the queue's first pool_size places: rebuild only that front
            queue = [i for i in queue[:self.pool_size] if i not in chosen] + queue[self.pool_size:]
            since += 1
            yield batch


class LossSampler(_SampleLossBase):
    """Sampler strategy over per-sample losses (Simionescu 2020, section 2.4.1): draws with replacement.

    At each rescoring ``pool_size`` distinct items are drawn uniformly; the next ``rescore_every``
    batches draw ``batch_size`` items from that pool with replacement (``torch.multinomial``), with
    probability proportional to ``score`` (``"direct"``) or ``1 / (score + eps)`` (``"inverse"``).
    Non-finite or negative weights count as 0 (with a warning); if none is positive the draw is uniform.

    Args:
        data, model, batch_size, pool_size (default ``4 * batch_size``, at most the dataset size),
            num_classes, prepare, loss_fn, score_mode, eval_batch_size, rescore_every, seed: see
            :class:`LossOrderer`.
        weighting: ``"direct"`` or ``"inverse"``.
        num_batches: batches per epoch (default ``ceil(N / batch_size)``).
        eps: added to the score before inverting.

    Yields:
        lists of ``batch_size`` dataset indices (Python ints; repeats possible).
    """

    def __init__(self, data: Any, model: nn.Module, batch_size: int, pool_size: int | None = None, *,
                 weighting: Literal["direct", "inverse"] = "direct", num_batches: int | None = None,
                 eps: float = 1e-8, **kwargs: Any) -> None:
        super().__init__(data, model, batch_size, pool_size, **kwargs)
        if weighting not in ("direct", "inverse"):
            raise ValueError(f"weighting must be 'direct' or 'inverse', got {weighting!r}")
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                        or num_batches < 1):
            raise ValueError(f"num_batches must be an int >= 1 or None, got {num_batches!r}")
        self.pool_size = min(self.pool_size, self.size)
        self.weighting, self.eps = weighting, float(eps)
        self.num_batches = num_batches if num_batches is not None else math.ceil(self.size / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """Draw weights ``(n,)`` float64 from scores ``(n,)``: ``score`` ("direct") or ``1 / (score + eps)``
        ("inverse"); ``torch.multinomial`` normalises them to probabilities."""
        scores = scores.double()
        w = scores if self.weighting == "direct" else 1.0 / (scores + self.eps)
        bad = ~torch.isfinite(w) | (w < 0)
        if bool(bad.any()):
            warnings.warn(f"{int(bad.sum())} of {w.numel()} sample weights are non-finite or negative; "
                          "they are not drawn", RuntimeWarning)
            w = torch.where(bad, torch.zeros_like(w), w)
        if not bool((w > 0).any()):
            warnings.warn("no sample has a positive weight; drawing uniformly", RuntimeWarning)
            w = torch.ones_like(w)
        return w

    def __iter__(self) -> Iterator[list[int]]:
        self.epoch += 1
        pool = w = None
        for t in range(self.num_batches):
            if t % self.rescore_every == 0:
                pool = torch.randperm(self.size, generator=self.generator)[:self.pool_size]
                w = self.weights(self.score(pool))
            assert pool is not None and w is not None
            draw = torch.multinomial(w, self.batch_size, replacement=True, generator=self.generator)
            yield pool[draw].tolist()
