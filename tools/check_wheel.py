"""Build regpipe's sdist and wheel and check the wheel as a user gets it (``make check-wheel``).

The editable install that ``make`` uses reads the checkout, so it cannot show a package missing from the
wheel. This script, run by the project environment's Python (``.venv/bin/python``):

1. builds the sdist, then the wheel *from the sdist* (``python -m build --no-isolation``), in a temporary
   folder outside the checkout;
2. checks that the wheel holds exactly the checkout's modules (``regpipe/**.py``, ``kernels/**.py`` as
   ``regpipe/kernels/...``, ``loaders/**.py`` as ``regpipe/loaders/...``) and nothing else;
3. creates a fresh virtual environment outside the checkout that sees this environment's site-packages
   through a ``.pth`` file (so torch is not downloaded again; a ``.pth`` file's own ``.pth`` files, such as
   the editable install's finder, are not processed, so the checkout stays invisible), installs the wheel
   into it with ``pip --no-index`` (its declared dependencies resolved against what is installed here);
4. from that environment: imports every module of the installed package (``regpipe.__file__`` must lie
   in the fresh environment), runs ``regpipe --version`` (must print pyproject.toml's version) and a
   one-epoch ``regpipe train`` on Fashion-MNIST;
5. checks that this environment's installed distributions are unchanged (pip never touched it).

Any failure exits non-zero with a message naming what was wrong. ``--keep`` keeps the temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: installed package -> folder of the checkout that holds its sources (setup.py's mapping)
SOURCES = {"regpipe": ROOT / "regpipe", "regpipe/kernels": ROOT / "kernels", "regpipe/loaders": ROOT / "loaders"}
#: a small, fast training run (Fashion-MNIST from `make dataset`)
TRAIN_ARGS = ["--epochs", "1", "--samples-per-class", "10", "--device", "cpu", "--no-progress"]

#: run by the fresh environment's Python: import every module of the wheel, print where regpipe came from
IMPORT_ALL = """
import importlib, json, sys
names = json.loads(sys.argv[1])
for name in names:
    importlib.import_module(name)
import regpipe
print(regpipe.__file__)
"""


class CheckFailed(RuntimeError):
    """What the wheel or the environment got wrong."""


def run(cmd: list[str], **kwargs) -> str:
    """Run ``cmd``; its stdout, or :class:`CheckFailed` with its output when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def expected_files() -> set[str]:
    """The ``.py`` files the wheel must hold, as paths inside it."""
    files = set()
    for prefix, folder in SOURCES.items():
        files.update(f"{prefix}/{path.relative_to(folder).as_posix()}" for path in folder.rglob("*.py"))
    return files


def build(out: Path) -> tuple[Path, Path]:
    """The sdist and the wheel built from it (``python -m build`` builds the wheel from the sdist)."""
    egg_info = ROOT / "regpipe.egg-info"
    existed = egg_info.exists()
    try:
        run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)])
    finally:
        # setuptools writes the sdist's metadata into the checkout; left there, Python started from the
        # checkout would read its version instead of the installed one's after a version change
        if not existed:
            shutil.rmtree(egg_info, ignore_errors=True)
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        raise CheckFailed(f"expected one sdist and one wheel in {out}, found {[p.name for p in out.iterdir()]}")
    return sdists[0], wheels[0]


def check_contents(wheel: Path) -> list[str]:
    """The wheel holds exactly the checkout's modules; returns their dotted names (``__main__`` left out)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    python = {n for n in names if n.endswith(".py")}
    others = {n for n in names if not n.endswith(".py") and ".dist-info/" not in n}
    missing, extra = expected_files() - python, python - expected_files()
    if missing or extra or others:
        raise CheckFailed(f"{wheel.name}: missing {sorted(missing)}, unexpected {sorted(extra | others)}")
    modules = (n[:-3].replace("/", ".").removesuffix(".__init__") for n in python)
    return sorted(m for m in modules if not m.endswith("__main__"))  # __main__ runs the command on import


def site_dirs() -> list[str]:
    """The site-packages folders this Python reads (its own and those its ``.pth`` files chain to)."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def snapshot(dirs: list[str]) -> dict[str, str]:
    """Each installed distribution (its RECORD's digest) and ``.pth`` file (its digest) in ``dirs``."""
    state = {}
    for directory in dirs:
        for entry in sorted(Path(directory).iterdir()):
            target = entry / "RECORD" if entry.name.endswith(".dist-info") else entry
            if entry.name.endswith((".dist-info", ".pth", ".egg-link")) and target.is_file():
                state[str(entry)] = hashlib.sha256(target.read_bytes()).hexdigest()
    return state


def fresh_env(folder: Path, base: list[str]) -> Path:
    """A virtual environment without pip or setuptools of its own that also reads ``base``; its Python."""
    # --without-pip: the venv's bundled setuptools would shadow the (newer) one torch requires here
    run([sys.executable, "-m", "venv", "--without-pip", str(folder)])
    python = folder / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    (Path(purelib) / "regpipe-check-base.pth").write_text("".join(f"{d}\n" for d in base))
    return python


def check_installed(python: Path, modules: list[str], work: Path) -> None:
    """Import every module, ``regpipe --version`` and one training epoch from the fresh environment."""
    venv = python.parent.parent
    where = Path(run([str(python), "-c", IMPORT_ALL, json.dumps(modules)], cwd=work).strip().splitlines()[-1])
    if venv.resolve() not in where.resolve().parents:
        raise CheckFailed(f"regpipe was imported from {where}, not from the fresh environment {venv}")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    printed = run([str(venv / "bin" / "regpipe"), "--version"], cwd=work).strip()
    if printed != f"regpipe {version}":
        raise CheckFailed(f"regpipe --version printed {printed!r}, pyproject.toml says {version!r}")
    out = work / "train"
    run([str(venv / "bin" / "regpipe"), "train", *TRAIN_ARGS, "--out", str(out)], cwd=work)
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    if [row["epoch"] for row in epochs] != [1]:
        raise CheckFailed(f"regpipe train --epochs 1 logged epochs {[row['epoch'] for row in epochs]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="regpipe-check-wheel-"))
    try:
        base = site_dirs()
        before = snapshot(base)
        sdist, wheel = build(work / "dist")
        modules = check_contents(wheel)
        python = fresh_env(work / "venv", base)
        run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--quiet", str(wheel)])
        check_installed(python, modules, work)
        after = snapshot(base)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if changed:
            raise CheckFailed(f"installing the wheel changed the project environment: {changed}")
    except CheckFailed as err:
        print(f"check-wheel: FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"check-wheel: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"check-wheel: {sdist.name} and {wheel.name} (built from the sdist) OK: {len(modules)} modules import "
          f"from a fresh environment, --version, one training epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
