"""Exact runs on every loader: a run killed with SIGKILL (inside an epoch or at its end) and resumed with
``--resume`` trains the same per-epoch losses and ends with the same metrics as the uninterrupted run, on an
image folder read by torch's DataLoader (default workers and threads), DALI and FFCV; SIGTERM writes the
state and stops promptly; leftover temporary state files are cleaned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagefolder import write_image_folder
from regpipe.core.optional import import_optional
from regpipe.cli.command import main

HERE = Path(__file__).parent
TIMING = ("images_per_s",)
# 32 training images, batches of 8: 4 steps per epoch; a mid-epoch state every 3 global steps.
RUN = ["--image-size", "32", "--val-resize", "36", "--batch-size", "8", "--no-progress", "--device", "cpu",
       "--inv-layers", "layer1", "--k0", "2", "--delta-k", "2"]
#: Kill after global step 4: the last state is epoch 1's step 3 (inside the epoch). After step 5: the state
#: written at the end of epoch 1 (step 6's would come after the kill).
KILL_INSIDE, KILL_AT_END = 4, 5


@pytest.fixture(autouse=True, scope="module")
def fresh_thread_count():
    """The in-process runs use the thread count a fresh ``regpipe`` process has, as the killed subprocess
    does (an earlier test of the session may have changed torch's: the same machine *and* thread count is
    what makes runs repeat)."""
    import torch

    fresh = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                               capture_output=True, text=True, check=True).stdout)
    before = torch.get_num_threads()
    torch.set_num_threads(fresh)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), train_per_class=8, val_per_class=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("beton-cache")  # the FFCV conversion, shared by the module's runs


def _rows(out: Path) -> tuple[list[dict], float]:
    metrics = json.loads((out / "metrics.json").read_text())
    return [{k: v for k, v in row.items() if k not in TIMING} for row in metrics["epochs"]], metrics["test_accuracy"]


def _args(folder: Path, cache: Path, loader: str, recipe: str, out: Path, epochs: int = 2,
          checkpoint_every: int = 3) -> list[str]:
    return ["train", "--data", f"imagefolder:{folder}", "--loader", loader, "--recipe", recipe, "--out", str(out),
            "--cache-dir", str(cache), "--epochs", str(epochs), "--checkpoint-every", str(checkpoint_every), *RUN]


def _killed(args: list[str], after: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(HERE / "kill_probe.py"), str(after), *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("loader", ["torch", "dali", "ffcv"])
@pytest.mark.parametrize("recipe", ["gradual+invariance", "loss-delta"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(loader: str, recipe: str, folder: Path, cache: Path,
                                                         tmp_path: Path) -> None:
    library = {"torch": "torch", "dali": "nvidia.dali", "ffcv": "ffcv"}[loader]
    if import_optional(library) is None:  # not importorskip: it would leave FFCV's thread count of 1 in place
        pytest.skip(f"{library} is not installed")
    assert main(_args(folder, cache, loader, recipe, tmp_path / "whole")) == 0
    whole = _rows(tmp_path / "whole")
    assert [row["steps"] for row in whole[0]] == [4, 4]
    for name, after, position in (("inside", KILL_INSIDE, (0, 3)), ("end", KILL_AT_END, (1, 0))):
        out = tmp_path / name
        args = _args(folder, cache, loader, recipe, out)
        killed = _killed(args, after)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not (out / "metrics.json").exists()
        import torch

        state = torch.load(out / "state.pt", map_location="cpu", weights_only=False)
        assert (state["epoch"], state["step"]) == position  # the kill left the state we aimed at
        assert main([*args, "--resume"]) == 0
        assert _rows(out) == whole, f"{loader} {recipe}: resumed after a SIGKILL {name} an epoch differs"
        assert not (out / "state.pt").exists()


def test_sigterm_writes_the_state_and_stops_promptly(folder: Path, cache: Path, tmp_path: Path) -> None:
    # 12 epochs: long enough to be running when the signal comes; no periodic state (only SIGTERM's)
    args = _args(folder, cache, "torch", "gradual+invariance", tmp_path / "run", epochs=12, checkpoint_every=10**6)
    assert main(_args(folder, cache, "torch", "gradual+invariance", tmp_path / "whole", epochs=12,
                      checkpoint_every=10**6)) == 0
    whole = _rows(tmp_path / "whole")
    proc = subprocess.Popen([sys.executable, "-m", "regpipe", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    # the state written at the end of epoch 1 says the run is training; then signal it inside an epoch
    while not (tmp_path / "run" / "state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert time.time() - sent < 30  # after the step in progress, not at the end of the run
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
    import torch

    state = torch.load(tmp_path / "run" / "state.pt", map_location="cpu", weights_only=False)
    assert 1 <= state["epoch"] < 12
    assert main([*args, "--resume"]) == 0
    assert _rows(tmp_path / "run") == whole


def test_a_killed_writers_temporary_state_is_removed_by_the_next_run(folder: Path, cache: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = out / f".state.pt.tmp-{dead.pid}"
    stale.write_bytes(b"half a state")
    live = out / f".state.pt.tmp-{os.getppid()}"  # a running process's file is left alone
    live.write_bytes(b"being written")
    assert main(_args(folder, cache, "torch", "baseline", out, epochs=1)) == 0
    assert not stale.exists() and live.exists()


def test_checkpoint_every_says_when_a_recipe_resumes_only_at_epoch_starts(fake_dir: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"--checkpoint-every 2: recipe 'loss-order' resumes only at epoch starts"):
        assert main(["train", "--recipe", "loss-order", "--data-dir", str(fake_dir), "--samples-per-class", "4",
                     "--val-per-class", "2", "--batch-size", "8", "--epochs", "1", "--checkpoint-every", "2",
                     "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
