"""The checks that relate several settings of a run, in one place.

Each config dataclass checks its own fields when it is built (:mod:`regpipe.engine.config`); what depends on
two settings or more (the recipe and the data, the data and the loader, the schedule and the data...) is
checked here, by :func:`check_config`, which :func:`~regpipe.engine.train.train` runs first and
``regpipe compare`` runs for every run before the first one trains. It reads no data and touches no file.
"""

from __future__ import annotations

from regpipe.engine.algorithms import build_algorithms, reads_holdout
from regpipe.engine.config import AUGMENT_WORDS, TrainConfig, augment_words, check_val_resize
from regpipe.engine.loggers import check_logger
from regpipe.engine.splits import parse_data_spec

__all__ = ["IN_MEMORY_ONLY", "check_config"]

#: Recipe words that read the training set as in-memory arrays.
IN_MEMORY_ONLY = ("sign", "loss-order")


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot run together, before any work.

    Raises:
        ValueError: the settings are named, with what to change; :class:`~regpipe.engine.algorithms.ComposeError`
            (a ValueError) for recipe words whose algorithms cannot run together; an unknown recipe word.
        ImportError: the logger's package is missing.
    """
    check_val_resize(cfg.image_size, cfg.val_resize)
    if cfg.resume and cfg.out is None:
        raise ValueError("train.resume needs train.out: the folder whose state.pt the run resumes from")
    if not any(k >= cfg.cascade.stop_at for k in cfg.cascade.stages):
        raise ValueError(f"cascade.stop_at={cfg.cascade.stop_at} leaves none of the stages {cfg.cascade.stages}")
    algorithms = build_algorithms(cfg)  # unknown words, and algorithms that take over the same resource
    check_logger(cfg)
    spec = parse_data_spec(cfg.dataset)
    _check_augment(cfg, spec.kind if spec is not None else None)
    if spec is None:
        return
    if cfg.samples_per_class is not None:
        raise ValueError(f"train.samples_per_class={cfg.samples_per_class} is a small-data option, off for "
                         f"{spec.kind} data: leave it unset (auto) to train on every image")
    refused = [a.name for a in algorithms if a.name in IN_MEMORY_ONLY]
    if refused:
        raise ValueError(f"recipe {cfg.recipe!r}: {refused} read the whole training set in memory; they are "
                         f"not available with --data {spec.kind}:... (use an in-memory dataset)")
    if spec.kind != "beton":
        return
    if cfg.schedule == "plateau":
        raise ValueError("--schedule plateau decides from a held-out validation set, which --data beton:... "
                         "does not carve; use --schedule cosine or --data imagefolder:ROOT")
    if reads_holdout(algorithms):
        raise ValueError(f"recipe {cfg.recipe!r} decides from a held-out validation set, which --data beton:... "
                         "does not carve; use --data imagefolder:ROOT")
    if cfg.eval_subset is not None:
        raise ValueError("--eval-subset is not available with --data beton:... (FFCV reads the whole file); "
                         "use --eval-every to evaluate less often")
    if cfg.loader != "ffcv":
        raise ValueError(f"--data beton:... is read by FFCV: add --loader ffcv (got --loader {cfg.loader})")


def _check_augment(cfg: TrainConfig, streamed: str | None) -> None:
    """The base augmentation against the data: streamed data (``streamed``: its kind) is always cropped and
    flipped by its loader, and an in-memory crop with no padding would move nothing.

    Raises:
        ValueError: the setting and what to use instead.
    """
    base = ",".join(AUGMENT_WORDS)
    if streamed is not None:
        if cfg.augment != base:
            raise ValueError(f"--augment {cfg.augment}: {streamed}:... data is always augmented by the loader's "
                             f"random-resized crop and horizontal flip; use --augment auto or {base}")
        if cfg.augment_pad != TrainConfig.augment_pad:  # the field's default
            raise ValueError(f"--augment-pad {cfg.augment_pad} pads the crop of in-memory data; {streamed}:... data "
                             "is cropped by the loader's random-resized crop: leave --augment-pad unset")
        return
    if "crop" in augment_words(cfg.augment) and cfg.augment_pad == 0:
        raise ValueError(f"--augment {cfg.augment} with --augment-pad 0: a crop of the unpadded image is the image "
                         "itself; give a padding >= 1 (4 for 32-pixel images) or drop crop")
