"""Optional packages: "not installed" told apart from "installed, but importing it failed".

A package can be present and still fail to import: torchvision built for another torch (its ``nms``
operator is missing), a compiled extension built against another numpy, a missing system library.
Calling that "not installed" sends the user to ``pip install`` a package they already have. Every
place in regpipe that imports an optional package goes through :func:`import_optional` or
:func:`require`, so the two cases get their own messages and the import error is never lost.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import MappingProxyType, ModuleType

__all__ = ["INSTALL", "import_optional", "install_hint", "installed", "require"]

#: how to install the optional packages regpipe uses (their extras), by top-level module name
INSTALL = MappingProxyType({
    "PIL": "pip install 'regpipe[images]'",
    "matplotlib": "pip install 'regpipe[plot]'",
    "nvidia": "pip install 'regpipe[dali]' (nvidia-dali-cuda120)",
    "ffcv": "apt-get install libturbojpeg0-dev libopencv-dev pkg-config, then pip install 'regpipe[ffcv]'",
    "triton": "pip install 'regpipe[triton]'",
    "numba": "pip install numba",
    "lightning": "pip install 'regpipe[lightning]'",
    "submitit": "pip install 'regpipe[slurm]'",
})


def install_hint(module: str) -> str:
    """How to install the package that provides ``module`` (``pip install <top-level name>`` by default)."""
    top = module.partition(".")[0]
    return INSTALL.get(top, f"pip install {top}")


def installed(top: str) -> bool:
    """Whether the top-level package ``top`` can be found (already imported, or an import spec on the path).

    An entry ``None`` in ``sys.modules`` blocks the import and counts as absent (``find_spec`` says so);
    an imported module without a spec (made in memory) counts as present.
    """
    return sys.modules.get(top) is not None or importlib.util.find_spec(top) is not None


def _names_module(err: ModuleNotFoundError, module: str) -> bool:
    """True when ``err`` is about ``module`` itself or one of its parent packages (not a dependency of it)."""
    return err.name is not None and (module == err.name or module.startswith(err.name + "."))


def import_optional(module: str, *, needed_by: str | None = None, install: str | None = None) -> ModuleType | None:
    """Import ``module``; ``None`` when it is not installed.

    Not installed: its top-level package has no import spec (``importlib.util.find_spec``), or the import
    raises ``ModuleNotFoundError`` for ``module`` or a parent package (``nvidia.dali`` missing from an
    installed ``nvidia`` namespace). Anything else that goes wrong while importing it, whatever the
    exception (``RuntimeError``, ``OSError``, an ``ImportError`` of one of its own dependencies...), means
    the package is installed but broken here.

    Args:
        module: dotted module name, e.g. ``"nvidia.dali"``.
        needed_by: what needs it, for the error message (e.g. ``"--loader dali"``).
        install: how to (re)install it, for the error message (default: :func:`install_hint`).

    Raises:
        ImportError: the package is installed but importing it failed; the message names the package,
            the original exception's type and text, and the original is chained as ``__cause__``.
    """
    if not installed(module.partition(".")[0]):
        return None
    try:
        return _import_keeping_torch_threads(module)
    except ModuleNotFoundError as err:
        if _names_module(err, module):
            return None
        failure = err
    except Exception as err:  # a broken install fails with anything: RuntimeError, OSError, AttributeError...
        failure = err
    who = f"{needed_by} needs {module!r}, which" if needed_by else f"{module!r}"
    raise ImportError(f"{who} is installed but failed to import ({type(failure).__name__}: {failure}); "
                      f"it may be built for another torch, numpy or Python: reinstall it in this environment "
                      f"({install if install is not None else install_hint(module)})") from failure


def _import_keeping_torch_threads(module: str) -> ModuleType:
    """``importlib.import_module(module)``, undoing a change of torch's intra-op thread count made while it imported.

    FFCV sets it to 1 when its compiler module is first imported; left so, importing a loader would change the
    training process's thread count, hence its speed and the float sums of its CPU kernels (a run resumed in a
    fresh process would no longer add like the interrupted one). torch is only consulted when it is loaded already.
    """
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        return importlib.import_module(module)
    finally:
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def require(module: str, *, needed_by: str, install: str | None = None) -> ModuleType:
    """Import ``module`` for ``needed_by``, or raise an ImportError that says which problem it is.

    Args:
        module: dotted module name.
        needed_by: what needs it, e.g. ``"--loader dali"`` or ``"regpipe show"``.
        install: how to install it (default: :func:`install_hint`).

    Raises:
        ImportError: ``"<needed_by> needs '<module>', which is not installed: <install>"``, or the
            "installed but failed to import" error of :func:`import_optional`.
    """
    found = import_optional(module, needed_by=needed_by, install=install)
    if found is None:
        raise ImportError(f"{needed_by} needs {module!r}, which is not installed: "
                          f"{install if install is not None else install_hint(module)}")
    return found
