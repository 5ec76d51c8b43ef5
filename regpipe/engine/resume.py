"""The file that holds an interrupted run's whole training state (``OUT/state.pt``).

A run resumed from it (``regpipe train --resume``) continues with the same batches, the same op draws and
the same weights as the uninterrupted run, so it ends with the same per-epoch losses and metrics on the same
machine and thread count. What it holds is :meth:`regpipe.engine.state.TrainState.state_dict` plus the run's
settings, which a resumed run must share (:func:`load_state` names any that differ).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from regpipe.core.files import atomic_write

__all__ = ["STATE_FILE", "load_state", "save_state"]

#: The training-state file in the run's output folder.
STATE_FILE = "state.pt"
FORMAT = ("regpipe-train-state", 2)


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` ``state`` (plain values and tensors) to ``path`` atomically (temporary file + rename)."""
    return atomic_write(path, lambda tmp: torch.save({"format": FORMAT[0], "version": FORMAT[1], **state}, tmp))


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
