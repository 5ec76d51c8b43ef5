"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakedata import write_fake_fmnist


@pytest.fixture(scope="session")
def fake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Fashion-MNIST folder of 100 train / 30 test random images (10 / 3 per class), read-only for tests."""
    directory = tmp_path_factory.mktemp("fmnist")
    write_fake_fmnist(directory, n_train=100, n_test=30)
    return directory
