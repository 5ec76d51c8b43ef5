"""Atomic file writes and the temporary files they leave when a writer is killed.

A result file is written under a temporary name in its own folder and renamed over the final name
(``os.replace``, atomic on POSIX within one file system), so the final name only ever holds a complete
file: a kill during the write leaves the old file (or none) and a temporary file. The temporary name
carries the writer's process id, ``.NAME.tmp-PID-TOKEN[.SUFFIX]``, so a later write of the same file
can tell the leftovers of a dead process (removed) from the file of a process still writing (kept).
"""

from __future__ import annotations

import glob
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "remove_stale_temporaries", "temporary_name", "writer_gone"]

#: The writer's process id in a temporary name: ``.tmp-PID`` (then ``-TOKEN``, a suffix, or nothing).
_PID = re.compile(r"\.tmp-(\d+)")


def temporary_name(path: Path) -> Path:
    """A fresh temporary path next to ``path``: ``.NAME.tmp-PID-TOKEN`` plus ``path``'s suffix (writers such
    as matplotlib's ``savefig`` pick the format from it). Hidden, so folder listings skip it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` with a temporary path in ``path``'s folder, then rename it to ``path``.

    The folder is created. The temporary file is created empty first (mode ``0o666`` less the umask, as
    ``open`` would make it, not ``mkstemp``'s ``0o600``), so ``write`` may open it by name with any
    library (``torch.save``, ``savefig``, FFCV's writer). On any exception, ``KeyboardInterrupt``
    included, the temporary file is removed and the exception propagates; ``path`` is then untouched.
    The data is not ``fsync`` ed: the rename survives a killed process, not a power loss.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temporary_name(path)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:  # a token drawn twice: draw again
            continue
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def writer_gone(tmp: Path) -> bool:
    """Whether the process that wrote the temporary file ``tmp`` (``...tmp-PID...``) is gone, or is this one:
    its file is a leftover. Another live process's file (a writer still at work) is kept.

    Process ids are this machine's: in a folder shared between machines, another machine's live writer
    looks gone (its rename then fails with ``FileNotFoundError``, naming the file; nothing is corrupted).
    """
    match = _PID.search(tmp.name)
    if match is None:
        return True
    pid = int(match.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    except OverflowError:  # not a process id this system can have
        return True
    return False


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that writes of ``path`` by processes now gone left in its folder
    (``.NAME.tmp-PID...``, see :func:`writer_gone`); a live writer's file is kept.

    Returns:
        The removed files.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        if writer_gone(stale):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed
