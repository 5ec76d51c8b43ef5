"""Package discovery for setuptools (everything else is in pyproject.toml).

``kernels/`` and ``loaders/`` live at the repository root but are installed as ``regpipe.kernels`` and
``regpipe.loaders`` (a top-level ``kernels`` package already exists on PyPI). pyproject.toml's
``packages.find`` cannot put a prefix in front of what it finds, so the packages are discovered here:
every package under ``regpipe/``, and every package under each root folder renamed into ``regpipe.``.
Nothing is listed by hand, so a new sub-package is installed without touching this file; ``tests/`` and
``benchmarks/`` are not packages of ``regpipe`` and are never installed.
"""

from setuptools import find_packages, setup

#: installed package name -> folder at the repository root
ROOT_PACKAGES = {"regpipe.kernels": "kernels", "regpipe.loaders": "loaders"}


def discover() -> list[str]:
    """Every package of the distribution, sub-packages of the root folders included."""
    found = find_packages(include=["regpipe", "regpipe.*"])
    for name, folder in ROOT_PACKAGES.items():
        found += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(found)


setup(packages=discover(), package_dir=ROOT_PACKAGES)
