"""``regpipe train`` and ``regpipe compare`` run :func:`train`: one recipe, one seed.

The run is built once (:func:`~regpipe.engine.build.build_run`: a :class:`~regpipe.engine.loop.Run` and its
:class:`~regpipe.engine.state.TrainState`), then each epoch is trained, evaluated and closed by the loop's
functions (:mod:`regpipe.engine.loop`), with the state written atomically to ``OUT/state.pt`` every
``--checkpoint-every`` steps, at every epoch end and when the process is asked to stop (SIGTERM, as a
cluster's pre-emption does); ``--resume`` continues from it. Cleanup is in ``finally``: hooks come off the
model and the process group is left even when a run fails.
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from regpipe.core.batch import Batch
from regpipe.core.files import remove_stale_temporaries
from regpipe.engine import distributed
from regpipe.engine.algorithms import build_algorithms
from regpipe.engine.build import build_run
from regpipe.engine.checkpoint import save_checkpoint
from regpipe.engine.config import TrainConfig, write_config
from regpipe.engine.config_checks import check_config
from regpipe.engine.distributed import resolve_device
from regpipe.engine.evaluation import evaluate, evaluation_model
from regpipe.engine.loggers import open_logger
from regpipe.engine.loop import Preempted, Run, close_epoch, evaluate_epoch, evaluation_due, train_one_epoch
from regpipe.engine.models import check_model_name
from regpipe.engine.resume import STATE_FILE, load_state, save_state
from regpipe.engine.splits import RunData, prepare_data
from regpipe.engine.state import TrainState
from regpipe.engine.validate import check_run_outputs, write_json
from regpipe.ops.tta import TestTimeSumAugmentation

__all__ = ["Preempted", "RunData", "TrainConfig", "prepare_data", "train", "write_json"]

#: Run settings a resumed run may change (they do not change what it computes).
RESUMABLE_CHANGES = ("resume", "progress", "checkpoint_every", "workers", "out", "checkpoint_out", "cache_dir",
                     "logger")
#: The run's settings as YAML in OUT: `regpipe train --config OUT/config.yaml --out NEW` repeats the run.
CONFIG_FILE = "config.yaml"


def _check_run(cfg: TrainConfig) -> dict[str, Any] | None:
    """Refuse what cannot run before anything is read (the settings themselves are checked by
    :func:`check_config` before): output paths that are files, an unknown model, a state to resume that is
    missing, unreadable or written by other settings. Returns the state to resume (``None`` for a fresh run)."""
    check_run_outputs(cfg.out, cfg.checkpoint_out)
    check_model_name(cfg.model)
    if cfg.out is not None:
        remove_stale_temporaries(Path(cfg.out) / STATE_FILE)  # left by a run killed while writing its state
    if not cfg.resume:
        return None
    return load_state(Path(cfg.out) / STATE_FILE, asdict(cfg), RESUMABLE_CHANGES)


class StopSignal:
    """SIGTERM as a request to stop after the current step (a cluster's pre-emption warning), not a kill.

    Installed for the run's duration in the main thread (signal handlers cannot be set elsewhere; a run in
    another thread keeps the default handler). Under ``torchrun`` every rank polls the request summed over
    ranks, so all of them stop after the same step.
    """

    def __init__(self, info: distributed.DistInfo) -> None:
        self.info, self.requested = info, False

    def __call__(self) -> bool:
        if not self.info.distributed:
            return self.requested
        return distributed.all_reduce_sum([float(self.requested)], self.info)[0] > 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignal]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def request(signum: int, frame: Any) -> None:
            self.requested = True

        previous = signal.signal(signal.SIGTERM, request)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def train(cfg: TrainConfig, observe: Callable[[int, Batch], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.recipe`` on one seed; returns (and writes to ``cfg.out/metrics.json``) the metrics.

    Args:
        cfg: the run's settings.
        observe: called as ``observe(epoch, batch)`` with every training batch this process trains on
            (after the ops), e.g. to record which samples a rank read.

    Raises:
        ValueError: an unknown recipe word or device, or a setting an algorithm refuses (before any data
            is read); :class:`~regpipe.engine.algorithms.ComposeError` for algorithms that cannot run
            together; :class:`~regpipe.core.checks.NonFiniteLoss` for a non-finite training loss (naming
            the epoch and step).
        FileNotFoundError: missing data, or ``--resume`` without a saved state.
        Preempted: SIGTERM arrived; the state was written (where the recipe can resume there).
    """
    check_config(cfg)
    algorithms = build_algorithms(cfg)
    saved = _check_run(cfg)
    device = resolve_device(cfg.device)
    info = distributed.setup(device)
    if info.distributed and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    try:
        if cfg.out is not None and info.is_main:  # the file starts the run afresh: --resume is added by hand
            write_config(replace(cfg, resume=False), Path(cfg.out) / CONFIG_FILE)
        with tempfile.TemporaryDirectory(prefix="regpipe-") as scratch:  # removed however the run ends
            run, state = build_run(cfg, algorithms, device, info, Path(scratch), train, saved)
            with StopSignal(info).installed() as stop:
                return _train_epochs(run, state, observe, stop)
    finally:
        for alg in algorithms:
            alg.close()
        distributed.teardown(info)


def _checkpointer(run: Run) -> Callable[[TrainState], None] | None:
    """Writes the state to ``OUT/state.pt`` with the run's settings (rank 0; ``None`` without ``--out``)."""
    if run.cfg.out is None:
        return None
    path, config = Path(run.cfg.out) / STATE_FILE, asdict(run.cfg)

    def write(state: TrainState) -> None:
        if run.info.is_main:
            save_state(path, {"config": config, **state.state_dict()})
    return write


def _train_epochs(run: Run, state: TrainState, observe: Callable[[int, Batch], None] | None,
                  stop: StopSignal) -> dict[str, Any]:
    cfg = run.cfg
    started = time.perf_counter()
    checkpoint = _checkpointer(run)
    bar = tqdm(total=cfg.epochs * run.steps_per_epoch, initial=state.epoch * run.steps_per_epoch + state.step,
               desc=f"{cfg.recipe} seed {cfg.seed}", disable=not cfg.progress or not run.info.is_main, unit="step")
    logger = open_logger(cfg, run.info.is_main, first_epoch=state.epoch + 1)
    try:
        while state.epoch < cfg.epochs and not state.stopped:
            row = train_one_epoch(run, state, observe=observe, checkpoint=checkpoint, stop_requested=stop,
                                  progress=bar if not bar.disable else None)
            epoch_state = dict(state.totals.describe)
            test_acc, val_acc = evaluate_epoch(run, state) if evaluation_due(cfg, state.epoch) else (None, None)
            row = close_epoch(run, state, row, test_acc, val_acc)
            if logger is not None:
                logger.log_epoch(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc="-" if test_acc is None else f"{test_acc:.4f}",
                            img_s=f"{row['images_per_s']:.0f}", **epoch_state)
            if state.epoch < cfg.epochs and not state.stopped:
                if checkpoint is not None:
                    checkpoint(state)  # every epoch end: an interrupted run resumes from here at the latest
                if stop():
                    raise Preempted(state.epoch, 0, saved=checkpoint is not None, where=f"{cfg.out}/{STATE_FILE}")
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    return finish(run, state, time.perf_counter() - started)


def finish(run: Run, state: TrainState, seconds: float) -> dict[str, Any]:
    """Evaluate the final model on the whole test set (and its test-time augmentation), write the checkpoint
    (``--checkpoint-out``) and ``OUT/metrics.json``, remove ``OUT/state.pt``; return the metrics."""
    cfg, info, splits = run.cfg, run.info, run.splits
    for alg in run.algorithms:  # the hooks come off before the final evaluation (and again, harmlessly, later)
        alg.close()
    # One re-estimation of the BatchNorm statistics (while mixing) serves the accuracy, the TTA accuracy and the
    # checkpoint: `regpipe eval` of the checkpoint scores what this run reports.
    with evaluation_model(state.model, run.mixing(), run.bn_batches, cfg.bn_batches) as net:
        final_acc = evaluate(net, run.test_batches, info=info)
        tta_acc = None
        if cfg.tta_draws > 0:
            tta = TestTimeSumAugmentation(k=2, draws=cfg.tta_draws, seed=distributed.rank_seed(cfg.seed, info.rank))
            tta_acc = evaluate(net, run.test_batches, tta, info=info)
        if cfg.checkpoint_out is not None and info.is_main:
            save_checkpoint(cfg.checkpoint_out, net, cfg.model, splits.num_classes, splits.image_shape,
                            splits.mean, splits.std, asdict(cfg))
    history = state.history
    metrics: dict[str, Any] = {
        "recipe": cfg.recipe, "algorithms": [a.name for a in run.algorithms], "seed": cfg.seed,
        "device": str(run.device), "world_size": info.world_size, "test_accuracy": final_acc,
        "train_seconds": seconds, "train_samples": run.num_samples, "epochs": history, "config": asdict(cfg),
        **run.expansion,
        # the run's budget: optimizer steps and training rows (global batches, an algorithm's extra rows included)
        "optimizer_steps": sum(int(r["steps"]) for r in history),
        "images_seen": sum(int(r.get("images", round(r["rows_per_step"] * r["steps"]))) for r in history),
    }
    if splits.spec is not None:
        metrics["data"] = {"kind": splits.spec.kind, "train": str(splits.spec.train), "eval": str(splits.spec.val),
                           "mean": list(splits.mean), "std": list(splits.std)}
    if tta_acc is not None:
        metrics["test_accuracy_tta"] = tta_acc
    if cfg.out is not None and info.is_main:
        write_json(Path(cfg.out) / "metrics.json", metrics)
        (Path(cfg.out) / STATE_FILE).unlink(missing_ok=True)  # finished: nothing left to resume
    return metrics
