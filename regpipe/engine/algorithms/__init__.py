"""Training algorithms and the recipes that combine them.

A recipe is ``+``-joined algorithm words (``gradual+invariance``, ``sum+saliency``); each word names
one or more algorithms (:data:`RECIPE_WORDS`: ``invariance`` brings the replication it trains on), each
reading its own config dataclass from the run's :class:`~regpipe.engine.config.TrainConfig`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from regpipe.engine.algorithms.augment import BaseAugmentation
from regpipe.engine.algorithms.base import (
    Algorithm,
    ComposeError,
    Copies,
    DataContext,
    Resource,
    RunContext,
    Stage,
    StepInputs,
    StepReport,
    check_compatible,
    staged_ops,
)
from regpipe.engine.algorithms.boxes import CutMixAlgorithm, CutOutAlgorithm, MixUpAlgorithm
from regpipe.engine.algorithms.consistency import Invariance, Replication, Saliency, replication_augment
from regpipe.engine.algorithms.patchup import PatchUpAlgorithm
from regpipe.engine.algorithms.scoring import LossDelta, LossOrder
from regpipe.engine.algorithms.sign import Sign
from regpipe.engine.algorithms.sum_mix import CascadeSum, FixedSum, GradualSum
from regpipe.engine.config import STREAMED_PREFIXES, TrainConfig

__all__ = [
    "Algorithm",
    "BaseAugmentation",
    "ComposeError",
    "Copies",
    "DataContext",
    "RECIPE_WORDS",
    "Resource",
    "RunContext",
    "Stage",
    "StepInputs",
    "StepReport",
    "build_algorithms",
    "check_compatible",
    "parse_recipe",
    "reads_holdout",
    "replication_augment",
    "staged_ops",
]

Factory = Callable[[TrainConfig], Algorithm]

#: Each recipe word -> the algorithms it adds, built from the run's config. ``baseline`` adds none.
RECIPE_WORDS: dict[str, tuple[Factory, ...]] = {
    "baseline": (),
    "sum": (lambda c: FixedSum(c.sum),),
    "cascade": (lambda c: CascadeSum(c.cascade),),
    "gradual": (lambda c: GradualSum(c.gradual),),
    "patchup-soft": (lambda c: PatchUpAlgorithm("soft", c.patchup),),
    "patchup-hard": (lambda c: PatchUpAlgorithm("hard", c.patchup),),
    "loss-delta": (lambda c: LossDelta("same", c.loss_delta),),
    "loss-delta-external": (lambda c: LossDelta("external", c.loss_delta),),
    "loss-order": (lambda c: LossOrder(c.loss_order),),
    "replicate": (lambda c: Replication(c.replication),),
    "invariance": (lambda c: Replication(c.replication), lambda c: Invariance(c.invariance)),
    "saliency": (lambda c: Replication(c.replication), lambda c: Saliency(c.saliency)),
    "sign": (lambda c: Sign(c.sign),),
    "cutmix": (lambda c: CutMixAlgorithm(c.cutmix),),
    "cutout": (lambda c: CutOutAlgorithm(c.cutout),),
    "mixup": (lambda c: MixUpAlgorithm(c.mixup),),
}


def parse_recipe(recipe: str) -> list[str]:
    """``"gradual+invariance"`` -> ``["gradual", "invariance"]``.

    Raises:
        ValueError: an empty or unknown word (named, with the known ones), or a word given twice.
    """
    words = [w.strip() for w in recipe.split("+")] if isinstance(recipe, str) else []
    if not words or any(not w for w in words):
        raise ValueError(f"recipe {recipe!r} is not '+'-joined words; choose from {sorted(RECIPE_WORDS)}")
    unknown = [w for w in words if w not in RECIPE_WORDS]
    if unknown:
        raise ValueError(f"unknown recipe word(s) {unknown} in {recipe!r}; choose from {sorted(RECIPE_WORDS)}")
    repeated = sorted({w for w in words if words.count(w) > 1})
    if repeated:
        raise ValueError(f"recipe {recipe!r} names {repeated} more than once")
    if "baseline" in words and len(words) > 1:
        raise ValueError(f"recipe {recipe!r}: 'baseline' means no algorithm and combines with nothing")
    return words


def reads_holdout(algorithms: Sequence[Algorithm]) -> bool:
    """Whether an algorithm reads the held-out validation split: one that decides from its accuracy
    (``needs_validation``), or loss-delta-external, which measures its trial steps on its rows."""
    return any(a.needs_validation or a.name == "loss-delta-external" for a in algorithms)


def build_algorithms(cfg: TrainConfig) -> list[Algorithm]:
    """The algorithms of ``cfg.recipe`` in recipe order, each once (``invariance+saliency`` replicates once), after
    the base augmentation (:class:`BaseAugmentation`) when ``cfg.augment`` asks for one on in-memory data (data
    streamed from disk gets its base from the loader).

    Raises:
        ValueError: an unknown recipe word.
        ComposeError: two algorithms claim the same part of the loop (both are named).
    """
    algorithms: list[Algorithm] = []
    if cfg.augment != "none" and not cfg.dataset.startswith(STREAMED_PREFIXES):
        algorithms.append(BaseAugmentation(cfg.augment, cfg.augment_pad))
    for word in parse_recipe(cfg.recipe):
        for factory in RECIPE_WORDS[word]:
            alg = factory(cfg)
            if not any(type(a) is type(alg) and a.name == alg.name for a in algorithms):
                algorithms.append(alg)
    check_compatible(algorithms)
    return algorithms
