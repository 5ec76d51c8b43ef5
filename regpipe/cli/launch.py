"""``regpipe compare --launcher local|submitit``: each (recipe, seed) trained as its own job.

The jobs write where an in-process ``compare`` writes (``OUT/RECIPE/seedS``: ``metrics.json``, and with
``--eval`` the checkpoint and ``eval.json``); ``compare`` then reads every run back through its resume logic
(:func:`regpipe.cli.report.finished_run`), so the table, plot and JSON are the in-process ones, and a rerun
launches only the runs that have not finished.

* ``local``: ``--jobs N`` processes on this machine (``concurrent.futures`` with the ``spawn`` start method,
  so no process inherits another's torch threads), each run in a fresh process with ``cores / N`` torch
  threads.
* ``submitit``: one job per run through ``submitit.AutoExecutor``: Slurm where ``sbatch`` is found (or
  ``--slurm-cluster slurm``), else (or with ``--slurm-cluster local``) local subprocesses. ``--slurm-partition``,
  ``--slurm-gpus`` (per job), ``--slurm-time`` (minutes), ``--slurm-cpus``, ``--slurm-mem-gb``; ``--jobs N``
  caps how many run at once (Slurm's job-array parallelism). Logs go to ``OUT/slurm/``.

The options are fields of :class:`regpipe.cli.compare.CompareOptions`; the functions here read them as
attributes of ``args`` (those fields, ``rerun`` among them, plus ``out`` and ``device``).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from regpipe.cli.report import finished_run
from regpipe.core.optional import require
from regpipe.engine.config import TrainConfig
from regpipe.engine.distributed import resolve_device
from regpipe.engine.robustness import EvalSettings, evaluate_run

__all__ = ["Job", "JobsFailed", "check_launcher_options", "launch", "run_job", "LauncherName"]

#: ``compare --launcher`` choices: ``inline`` trains in the compare process, one run after another.
LauncherName = Literal["inline", "local", "submitit"]
#: The Slurm options (``dest`` names), refused with another launcher so that none is silently ignored.
SLURM_OPTIONS = ("slurm_partition", "slurm_gpus", "slurm_time", "slurm_cpus", "slurm_mem_gb", "slurm_cluster")


@dataclass(frozen=True)
class Job:
    """One (recipe, seed) run as a job: train it (and evaluate it, with ``--eval``).

    Attributes:
        cfg: the run's settings (``cfg.out`` is where it writes).
        settings: the ``--eval`` evaluation, or ``None``.
        device: the evaluation's device (``--device``).
        threads: torch threads of the job's process (0: torch's default).
    """

    cfg: TrainConfig
    settings: EvalSettings | None = None
    device: str = "auto"
    threads: int = 0

    @property
    def name(self) -> str:
        return f"{self.cfg.recipe} seed {self.cfg.seed}"


class JobsFailed(RuntimeError):
    """Some jobs failed; the others' results are in ``--out`` and a rerun launches only the failed ones."""


def run_job(job: Job) -> str:
    """Train (and evaluate) one run in this process; returns a one-line summary. The function a job runs."""
    import torch

    from regpipe.engine.train import train

    if job.threads:
        torch.set_num_threads(job.threads)
    metrics = train(replace(job.cfg, progress=False))  # a job's output is a log file: no progress bar
    line = f"{job.name}: test accuracy {metrics['test_accuracy']:.4f} ({metrics['train_seconds']:.0f} s)"
    if job.settings is not None:
        evaluate_run(job.cfg, job.settings, resolve_device(job.device))  # kept in OUT/RECIPE/seedS/eval.json
    return line


def check_launcher_options(args: Any) -> None:
    """Refuse, before any work: ``--jobs`` < 1, a Slurm option without ``--launcher submitit``, negative Slurm
    numbers, and ``--launcher submitit`` without submitit installed."""
    if isinstance(args.jobs, bool) or args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    given = [f"--{name.replace('_', '-')}" for name in SLURM_OPTIONS if getattr(args, name) is not None]
    if given and args.launcher != "submitit":
        raise ValueError(f"{', '.join(given)} only apply to --launcher submitit (got --launcher {args.launcher})")
    for name, low in (("slurm_gpus", 0), ("slurm_cpus", 1), ("slurm_mem_gb", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.slurm_time is not None and args.slurm_time < 1:
        raise ValueError(f"--slurm-time must be >= 1 minute, got {args.slurm_time}")
    if args.launcher == "submitit":
        require("submitit", needed_by="regpipe compare --launcher submitit")


def pending(configs: dict[str, list[TrainConfig]], rerun: bool) -> list[TrainConfig]:
    """The runs a launcher trains: all with ``rerun``, else those not finished in their ``cfg.out``."""
    return [cfg for cfgs in configs.values() for cfg in cfgs if rerun or finished_run(cfg) is None]


def launch(args: Any, configs: dict[str, list[TrainConfig]], settings: EvalSettings | None,
           say: Callable[[str], None] = print) -> int:
    """Train the runs of ``configs`` that are not finished (all with ``--rerun``) with ``args.launcher``;
    returns how many were launched. ``inline`` launches nothing (``compare`` trains in its own process).

    Raises:
        JobsFailed: a job failed (each is named with its error, and for submitit its log); the others finished.
    """
    if args.launcher == "inline":
        return 0
    todo = pending(configs, args.rerun)
    say(f"{len(todo)} of {sum(len(c) for c in configs.values())} runs to train with --launcher {args.launcher}"
        + (f", {args.jobs} at a time" if args.launcher == "local" and len(todo) > 1 else ""))
    if not todo:
        return 0
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.launcher == "local" else 0
    jobs = [Job(cfg, settings, args.device, threads) for cfg in todo]
    run = _run_local if args.launcher == "local" else _run_submitit
    failures = run(args, jobs, say)
    if failures:
        raise JobsFailed(f"{len(failures)} of {len(jobs)} jobs failed (the others are in {args.out}; a rerun "
                         "launches only the failed ones):\n" + "\n".join(failures))
    return len(jobs)


def _run_local(args: Any, jobs: Sequence[Job], say: Callable[[str], None]) -> list[str]:
    """``--jobs`` local processes; returns one line per failed job."""
    failures: list[str] = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {pool.submit(run_job, job): job for job in jobs}
        try:
            for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
                job = futures[future]
                try:
                    say(f"[{done}/{len(jobs)}] {future.result()}")
                except Exception as err:  # a job's failure is reported with the others', not raised alone
                    failures.append(f"  {job.name}: {type(err).__name__}: {err}")
                    say(f"[{done}/{len(jobs)}] {job.name}: failed ({type(err).__name__})")
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return failures


def executor(args: Any) -> Any:
    """The ``submitit.AutoExecutor`` of the Slurm options, logging to ``OUT/slurm``."""
    submitit = require("submitit", needed_by="regpipe compare --launcher submitit")
    cluster = None if args.slurm_cluster in (None, "auto") else args.slurm_cluster
    ex = submitit.AutoExecutor(folder=Path(args.out) / "slurm" / "%j", cluster=cluster)
    parameters: dict[str, Any] = {"name": "regpipe-compare", "timeout_min": args.slurm_time or 240,
                                  "gpus_per_node": args.slurm_gpus or 0, "slurm_array_parallelism": args.jobs}
    if args.slurm_partition is not None:
        parameters["slurm_partition"] = args.slurm_partition
    if args.slurm_cpus is not None:
        parameters["cpus_per_task"] = args.slurm_cpus
    if args.slurm_mem_gb is not None:
        parameters["mem_gb"] = args.slurm_mem_gb
    ex.update_parameters(**parameters)
    return ex


def _run_submitit(args: Any, jobs: Sequence[Job], say: Callable[[str], None]) -> list[str]:
    """One submitit job per run (a job array); waits for all. Ctrl-C cancels the jobs not yet done, so a
    rerun does not train a run twice at once. Returns one line per failed job (with its log)."""
    submitted = executor(args).map_array(run_job, list(jobs))
    say(f"submitted {len(submitted)} job(s): {', '.join(str(j.job_id) for j in submitted)}; logs in "
        f"{Path(args.out) / 'slurm'}")
    failures: list[str] = []
    try:
        for done, (job, handle) in enumerate(zip(jobs, submitted), start=1):
            try:
                say(f"[{done}/{len(jobs)}] {handle.result()} (job {handle.job_id})")
            except Exception as err:  # submitit's FailedJobError carries the job's traceback
                failures.append(f"  {job.name} (job {handle.job_id}, log {handle.paths.stderr}): "
                                f"{str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}")
                say(f"[{done}/{len(jobs)}] {job.name}: failed (job {handle.job_id})")
    except KeyboardInterrupt:
        for handle in submitted:
            if not handle.done():
                handle.cancel(check=False)
        raise
    return failures
