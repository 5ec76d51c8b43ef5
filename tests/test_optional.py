"""Optional packages: "not installed" and "installed but failed to import" are told apart, everywhere.

The broken packages are real packages on ``sys.path`` (``tmp_path``) whose import raises, as a torchvision
built for another torch does; the missing ones have names no index serves.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from regpipe.core.optional import import_optional, install_hint, require

MISSING = "regpipe_test_no_such_package"


def _package(root: Path, name: str, init: str) -> None:
    """A package ``name`` under ``root`` whose ``__init__`` is ``init``."""
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(init)


@pytest.fixture
def broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put a package on sys.path whose import raises ``init``'s error (shadowing any installed one)."""
    def make(name: str, init: str) -> None:
        _package(tmp_path, name, init)
        monkeypatch.syspath_prepend(str(tmp_path))
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)  # restored afterwards, so later tests see the real one
    return make


def test_missing_package_is_not_installed() -> None:
    assert import_optional(MISSING) is None
    assert import_optional(f"{MISSING}.sub") is None
    with pytest.raises(ImportError, match=f"^the test needs '{MISSING}', which is not installed: pip install {MISSING}$"):
        require(MISSING, needed_by="the test")


def test_package_that_raises_is_installed_but_broken(broken) -> None:
    broken("regpipe_test_broken", 'raise RuntimeError("operator torchvision::nms does not exist")\n')
    for call, start in ((lambda: import_optional("regpipe_test_broken"), "'regpipe_test_broken' is installed"),
                        (lambda: require("regpipe_test_broken", needed_by="the test"),
                         "the test needs 'regpipe_test_broken', which is installed")):
        with pytest.raises(ImportError) as info:
            call()
        message = str(info.value)
        assert message.startswith(start)
        assert "installed but failed to import (RuntimeError: operator torchvision::nms does not exist)" in message
        assert "not installed" not in message
        assert isinstance(info.value.__cause__, RuntimeError)  # the original error is kept


def test_missing_dependency_of_an_installed_package_is_broken_not_missing(broken) -> None:
    """A ModuleNotFoundError raised *inside* the package (a dependency of it is missing) is not "not installed"."""
    broken("regpipe_test_needs_dep", f"import {MISSING}\n")
    with pytest.raises(ImportError, match=rf"installed but failed to import \(ModuleNotFoundError: No module named "
                                          rf"'{MISSING}'\)"):
        require("regpipe_test_needs_dep", needed_by="the test")


def test_missing_submodule_of_an_installed_package_is_not_installed(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``nvidia.dali`` absent from an installed ``nvidia`` namespace: the module itself is not installed."""
    _package(tmp_path, "regpipe_test_parent", "")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_optional("regpipe_test_parent") is not None
    assert import_optional("regpipe_test_parent.absent") is None
    with pytest.raises(ImportError, match="which is not installed"):
        require("regpipe_test_parent.absent", needed_by="the test")


def test_a_package_that_changes_torchs_thread_count_on_import_leaves_it_as_it_was(broken) -> None:
    """FFCV sets torch's intra-op thread count to 1 when imported; through ``require`` the process keeps its own."""
    before = torch.get_num_threads()
    broken("regpipe_test_sets_threads", f"import torch\ntorch.set_num_threads({before + 1})\n")
    try:
        assert require("regpipe_test_sets_threads", needed_by="the test") is not None
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_install_hints_name_the_extras() -> None:
    assert install_hint("nvidia.dali") == "pip install 'regpipe[dali]' (nvidia-dali-cuda120)"
    assert install_hint("matplotlib.pyplot") == "pip install 'regpipe[plot]'"
    assert install_hint("timm.layers") == "pip install timm"


def test_loader_library_missing_or_broken(broken, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--loader dali`` without DALI and ``--loader ffcv`` with an FFCV whose extension does not load say
    different things, both before any data is read."""
    from regpipe.loaders import make_train_loader

    class Unread(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            raise AssertionError("the dataset was read before the library was checked")

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # DALI absent from the nvidia namespace
    with pytest.raises(ImportError, match=r"^--loader dali needs 'nvidia.dali', which is not installed: "
                                          r"pip install 'regpipe\[dali\]'"):
        make_train_loader("dali", Unread(), [[0, 1]], 10)
    broken("ffcv", 'raise OSError("libturbojpeg.so.0: cannot open shared object file")\n')
    with pytest.raises(ImportError, match=r"^--loader ffcv needs 'ffcv', which is installed but failed to import "
                                          r"\(OSError: libturbojpeg.so.0: cannot open shared object file\)"):
        make_train_loader("ffcv", Unread(), [[0, 1]], 10)


def test_show_with_broken_matplotlib_says_so(broken, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from regpipe.cli import main

    broken("matplotlib", 'raise ImportError("numpy.core.multiarray failed to import")\n')
    assert main(["show", "sum", "--out", str(tmp_path / "sum.png")]) == 2
    err = capsys.readouterr().err
    assert ("regpipe show needs 'matplotlib', which is installed but failed to import "
            "(ImportError: numpy.core.multiarray failed to import)") in err
    assert not (tmp_path / "sum.png").exists()


def test_bench_notes_a_broken_peer_as_broken(broken) -> None:
    from regpipe.cli.bench import _peer

    broken("regpipe_test_peer", 'raise RuntimeError("built for torch 2.4")\n')
    notes: list[str] = []
    assert _peer("regpipe_test_peer", notes, "peer rows") is None
    assert _peer(MISSING, notes, "other rows") is None
    assert notes[0].startswith("peer rows: skipped (peer rows needs 'regpipe_test_peer', which is installed but "
                               "failed to import (RuntimeError: built for torch 2.4)")
    assert notes[1] == f"other rows: skipped (other rows needs '{MISSING}', which is not installed: pip install {MISSING})"
