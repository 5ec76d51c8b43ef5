"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fakedata import write_fake_fmnist

#: torch's intra-op thread count when the session started
SESSION_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _session_thread_count() -> Iterator[None]:
    """Every test starts with the session's torch thread count. Importing FFCV sets it to 1 (regpipe's imports
    undo that, ``pytest.importorskip`` does not), and a count left changed by one test would change the float
    sums of the next ones' in-process runs, which the exact-resume tests compare with fresh processes."""
    torch.set_num_threads(SESSION_THREADS)
    yield


@pytest.fixture(scope="session")
def fake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Fashion-MNIST folder of 100 train / 30 test random images (10 / 3 per class), read-only for tests."""
    directory = tmp_path_factory.mktemp("fmnist")
    write_fake_fmnist(directory, n_train=100, n_test=30)
    return directory
