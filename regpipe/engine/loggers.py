"""Per-epoch loggers besides ``OUT/metrics.json``: TensorBoard event files and Weights & Biases runs.

``--logger tensorboard`` writes event files into ``OUT`` through :mod:`torch.utils.tensorboard`;
``--logger wandb`` logs to a W&B run named ``RECIPE/seedS`` in group ``RECIPE`` (``WANDB_MODE=offline``
keeps it on disk, under ``OUT/wandb``). Both log the numbers of each epoch's row of ``metrics.json``, at
step = the epoch (1-based), under the row's own keys: ``train_loss``, ``test_accuracy``, ``val_accuracy``,
``lr``, ``images_per_s``, the algorithms' state (``k``, ``t``, ``m``, ``prob``...) and the means of their
per-step terms (``mean_invariance``, ``mean_saliency``...). Only rank 0 of a ``torchrun`` job logs.
``compare`` trains each run into its own folder ``OUT/RECIPE/seedS``, so ``tensorboard --logdir OUT`` shows
the runs under those names.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from regpipe.core.optional import require
from regpipe.engine.config import TrainConfig, config_to_dict, config_yaml

__all__ = ["EpochLogger", "TensorBoardLogger", "WandbLogger", "check_logger", "epoch_scalars", "open_logger"]

#: The module each logger imports and how to install it.
LOGGER_MODULES = MappingProxyType({"tensorboard": ("torch.utils.tensorboard", "pip install 'regpipe[tensorboard]'"),
                                   "wandb": ("wandb", "pip install 'regpipe[wandb]'")})


class EpochLogger(Protocol):
    """Receives each finished epoch's row; closed when the run ends, however it ends."""

    def log_epoch(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def epoch_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of an epoch row, by key, without ``epoch`` (the step they are logged at).

    Values that are not real numbers (an algorithm's state such as ``order: "descending"``, which the run's
    config already records) are not scalars and are left out; booleans too.
    """
    return {key: float(value) for key, value in row.items()
            if key != "epoch" and isinstance(value, numbers.Real) and not isinstance(value, bool)}


def check_logger(cfg: TrainConfig) -> None:
    """Refuse a logger that cannot run, before any work: one without ``out`` to write into, or whose
    package is missing or broken.

    Raises:
        ValueError: ``logger`` other than json without ``out``.
        ImportError: the logger's package is not installed (the extra to install is named) or fails to import.
    """
    if cfg.logger == "json":
        return
    if cfg.out is None:
        raise ValueError(f"train.logger={cfg.logger!r} writes under train.out: set --out")
    module, install = LOGGER_MODULES[cfg.logger]
    require(module, needed_by=f"--logger {cfg.logger}", install=install)


@dataclass
class TensorBoardLogger:
    """Scalars into TensorBoard event files in ``log_dir`` (:class:`torch.utils.tensorboard.SummaryWriter`).

    ``first_epoch`` is the 1-based epoch this process logs first (1, or a resumed run's): TensorBoard discards
    the events of earlier processes in ``log_dir`` at that step and later (``purge_step``), so an epoch logged
    before a kill and trained again is not shown twice, and a run trained again into the same folder
    replaces the earlier curves instead of drawing over them.
    """

    log_dir: str
    config_yaml: str
    first_epoch: int = 1

    def __post_init__(self) -> None:
        tensorboard = require("torch.utils.tensorboard", needed_by="--logger tensorboard",
                              install=LOGGER_MODULES["tensorboard"][1])
        self.writer = tensorboard.SummaryWriter(log_dir=self.log_dir, purge_step=self.first_epoch)
        # The settings beside the curves (TEXT tab), indented so TensorBoard's markdown keeps the lines.
        self.writer.add_text("config", "\n".join("    " + line for line in self.config_yaml.splitlines()),
                             global_step=self.first_epoch)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        for key, value in epoch_scalars(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["epoch"]))
        self.writer.flush()  # an epoch's numbers are on disk when the epoch ends, for a watching TensorBoard

    def close(self) -> None:
        self.writer.close()


@dataclass
class WandbLogger:
    """Scalars into a Weights & Biases run named ``RECIPE/seedS`` in group ``RECIPE`` (project
    ``$WANDB_PROJECT``, else ``regpipe``), its files under ``OUT/wandb``; the run's config is its settings."""

    cfg: TrainConfig

    def __post_init__(self) -> None:
        wandb = require("wandb", needed_by="--logger wandb", install=LOGGER_MODULES["wandb"][1])
        os.makedirs(self.cfg.out, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "regpipe"), dir=self.cfg.out,
                              name=f"{self.cfg.recipe}/seed{self.cfg.seed}", group=self.cfg.recipe,
                              config=config_to_dict(self.cfg), reinit="create_new")

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        self.run.log({"epoch": int(row["epoch"]), **epoch_scalars(row)}, step=int(row["epoch"]))

    def close(self) -> None:
        self.run.finish()


def open_logger(cfg: TrainConfig, is_main: bool, first_epoch: int = 1) -> EpochLogger | None:
    """The run's logger (``None`` for ``--logger json``, whose ``metrics.json`` the run writes anyway, and on
    every rank but 0).

    Args:
        first_epoch: the 1-based epoch this process logs first (a resumed run's).
    """
    if cfg.logger == "json" or not is_main:
        return None
    if cfg.logger == "tensorboard":
        return TensorBoardLogger(str(cfg.out), config_yaml(cfg), first_epoch)
    return WandbLogger(cfg)
