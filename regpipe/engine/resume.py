"""Resuming an interrupted run: the data order's position and the file that holds the whole training state.

A run resumed from ``OUT/state.pt`` (``regpipe train --resume``) continues with the same batches, the same
op draws and the same weights as the uninterrupted run, so on the CPU it ends with the same metrics. What
has state is saved (:func:`save_state`): the model, optimizer, learning-rate schedule, gradient scaler,
every algorithm's ``state_dict`` (ops' generators, the cascade, the gradual step count), the generator of
the BatchNorm re-estimation batches, torch's global generators, the epoch and step, the epoch's running
sums and the history so far, and the data order (:class:`ResumableBatches`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["STATE_FILE", "ResumableBatches", "find_generators", "load_state", "save_state"]

#: The training-state file in the run's output folder.
STATE_FILE = "state.pt"
FORMAT = ("regpipe-train-state", 1)


def find_generators(sampler: Any, depth: int = 4) -> list[torch.Generator]:
    """The ``torch.Generator`` s a batch sampler draws from: its ``generator`` attribute and those of the
    samplers it wraps (``sampler``, ``batch_sampler``), so that e.g. ``BatchSampler(RandomSampler(...,
    generator=g))`` gives ``[g]``."""
    found: list[torch.Generator] = []
    stack = [(sampler, 0)]
    while stack:
        obj, level = stack.pop()
        generator = getattr(obj, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
        if level < depth:
            stack.extend((getattr(obj, name), level + 1) for name in ("sampler", "batch_sampler")
                         if getattr(obj, name, None) is not None)
    return found


class ResumableBatches(torch.utils.data.Sampler):
    """A global batch sampler whose position can be saved and restored.

    Pass ``p`` (``p = 0, 1, ...``, one per epoch) of ``inner`` is determined by the states of its generators
    when the pass starts; this wrapper records them per pass. Restoring (:meth:`resume_at`) sets them back
    for the resumed epoch and drops the batches already trained on, without loading any data.

    Args:
        inner: the global batch sampler (index lists), re-iterated every epoch.
        generators: the generators ``inner`` draws from (default: :func:`find_generators`); nothing else may
            draw from them.
    """

    def __init__(self, inner: Iterable[Sequence[int]], generators: Sequence[torch.Generator] | None = None) -> None:
        self.inner = inner
        self.generators = list(find_generators(inner) if generators is None else generators)
        self.next_pass = 0
        self.starts: dict[int, list[torch.Tensor]] = {}
        self._restore: list[torch.Tensor] | None = None
        self._skip = 0

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        if self._restore is not None:
            for g, s in zip(self.generators, self._restore):
                g.set_state(s)
        skip, self._restore, self._skip = self._skip, None, 0
        self.starts = {p: s for p, s in self.starts.items() if p >= self.next_pass - 1}
        self.starts[self.next_pass] = [g.get_state() for g in self.generators]
        self.next_pass += 1
        for i, batch in enumerate(self.inner):
            if i >= skip:
                yield list(batch)

    def state_for(self, epoch: int) -> dict[str, Any]:
        """What restarts epoch ``epoch`` (0-based): its generators' states when its pass started (or now, if
        it has not started yet)."""
        if epoch in self.starts:
            states = self.starts[epoch]
        elif epoch == self.next_pass:
            states = [g.get_state() for g in self.generators]
        else:
            raise ValueError(f"the data order of epoch {epoch} is no longer known (passes started: "
                             f"{sorted(self.starts)}, next {self.next_pass})")
        return {"epoch": epoch, "generators": [s.clone() for s in states]}

    def resume_at(self, state: dict[str, Any], skip: int) -> None:
        """Make the next pass epoch ``state["epoch"]`` with its first ``skip`` batches dropped.

        Raises:
            ValueError: the state holds another number of generators than this sampler draws from.
        """
        if len(state["generators"]) != len(self.generators):
            raise ValueError(f"the saved data order has {len(state['generators'])} generators, this run's sampler "
                             f"{len(self.generators)}: was it written by another recipe?")
        self.next_pass = int(state["epoch"])
        self._restore = list(state["generators"])
        self._skip = int(skip)


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` ``state`` (plain values and tensors) to ``path`` atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format": FORMAT[0], "version": FORMAT[1], **state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_state(path: str | Path, config: dict[str, Any], may_differ: Iterable[str] = ()) -> dict[str, Any]:
    """Read a state written by :func:`save_state` for a run with ``config`` (``asdict(TrainConfig)``).

    Raises:
        FileNotFoundError: no state at ``path`` (nothing to resume).
        ValueError: not a regpipe training state, or written by a run whose settings differ from ``config``
            in other fields than ``may_differ`` (the differing fields are named, with both values).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist (a run writes it every "
                                "--checkpoint-every steps and at each epoch end, and removes it when it finishes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or foreign file
        raise ValueError(f"{path} is not a readable regpipe training state: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT[0] or state.get("version") != FORMAT[1]:
        raise ValueError(f"{path} is not a regpipe training state (version {FORMAT[1]})")
    skip = set(may_differ)
    differ = {k: (state["config"].get(k), v) for k, v in config.items()
              if k not in skip and state["config"].get(k) != v}
    if differ:
        named = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ValueError(f"cannot resume from {path}: the run was started with other settings ({named})")
    return state
