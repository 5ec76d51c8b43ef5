"""The one fused mixing kernel (regpipe.kernels.FusedMix) against the one torch reference (normalize, then
regpipe.functional.sum_mix.mix_rows), in every mode, dtype and layout (STYLE 7, 8, 10).

* numba (CPU) runs here directly.
* Triton runs on CUDA when there is one, and on CPU under ``TRITON_INTERPRET=1``. Triton reads that
  variable when a kernel is decorated (at import), so the interpreter tests run in a subprocess:
  :func:`test_triton_kernels_under_interpreter` starts ``pytest -k triton`` on this file with the
  variable set, and the ``*_triton_*`` tests skip in a process that has neither CUDA nor the variable.
* CUDA-only checks skip without CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from regpipe.core.mix_plan import MixPlan
from regpipe.kernels import BACKEND_ENV, FusedMix, resolve_backend
from regpipe.kernels import row_mix as rm

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRET or HAS_CUDA),
    reason="Triton kernels run on CUDA, or on CPU in the TRITON_INTERPRET=1 subprocess "
           "(test_triton_kernels_under_interpreter)" if HAS_TRITON else "triton is not installed (extra `triton`)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

# Accumulation is float32 everywhere; the output is rounded once. float16/bfloat16: one unit in the last
# place of values up to ~5 (the reference's float32 and the kernel's can round to neighbours; Triton's
# interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]
MEAN4, STD4 = [0.485, 0.456, 0.406, 0.5], [0.229, 0.224, 0.225, 0.3]

# (shape, plan kind, weights, seed): N not a power of 2, odd H/W, C = 1/3/4, several pixel chunks of the numba
# kernel (50 x 50 > 2048), zero-weight columns (trailing, middle, leading), one active column, per-row weights,
# and the three row tables of the ops (group, permutation, any rows with repeats). Seeds are fixed integers
# (Python salts the built-in string hash per process), so every run tests the same data.
CASES = [
    ((6, 3, 5, 7), "group", (0.5, 0.5), 101),
    ((9, 1, 9, 3), "permute", (0.5, 0.3, 0.2), 102),
    ((12, 3, 50, 50), "group", (0.5, 0.5, 0.0, 0.0), 103),
    ((10, 4, 3, 1), "free", (0.6, 0.0, 0.4), 104),
    ((3, 3, 7, 5), "group", (0.0, 1.0, 0.0), 105),
    ((8, 3, 6, 5), "rows", None, 106),
]
CASE_IDS = ["6x3x5x7-group-k2", "9x1x9x3-permute-k3", "12x3x50x50-group-k4-zeros", "10x4x3x1-free-k3-zero",
            "3x3x7x5-one-column", "8x3x6x5-per-row-weights"]


def _input(shape: tuple[int, ...], dtype: torch.dtype, fmt: torch.memory_format, device: str = "cpu", *,
           seed: int) -> torch.Tensor:
    """Random 0..255 pixels (as ``dtype``: uint8, or floats ``x / 255``) from a CPU generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    if dtype != torch.uint8:
        x = (x.double() / 255.0).to(dtype)
    return x.to(device).contiguous(memory_format=fmt)


def _norm(shape: tuple[int, ...]) -> tuple[list[float], list[float]]:
    return MEAN4[: shape[1]], STD4[: shape[1]]


def _plan(n: int, kind: str, weights: tuple[float, ...] | None, seed: int, device: str = "cpu") -> MixPlan:
    """A plan of the given kind: ``group`` (``g * n + i``), ``permute`` (row, then permutations), ``free`` (any rows,
    repeats allowed), ``rows`` (k = 3, any rows, a weight per row: CutMix's kind of plan)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "rows":
        sources = torch.randint(0, n, (n, 3), generator=g)
        w = torch.rand(n, 3, generator=g)
        return MixPlan(sources.to(device), (w / w.sum(1, keepdim=True)).to(device))
    k = len(weights)
    if kind == "group":
        sources = torch.arange(n - n % k).view(k, n // k).t().contiguous()
    elif kind == "permute":
        sources = torch.stack([torch.arange(n)] + [torch.randperm(n, generator=g) for _ in range(k - 1)], 1)
    else:
        sources = torch.randint(0, n, (n // 2 + 1, k), generator=g)
    return MixPlan.uniform(sources.to(device), weights)


def _naive_mix(x: torch.Tensor, plan: MixPlan, mean: list[float], std: list[float]) -> torch.Tensor:
    """Per output row and channel, in float64: sum_g w[i, g] (x[s[i, g], c] * q - mean[c]) / std[c]."""
    q = 1 / 255 if x.dtype == torch.uint8 else 1.0
    x, rows, weights = x.cpu().double(), plan.sources.cpu(), plan.weights.cpu().double()
    out = torch.zeros(rows.shape[0], *x.shape[1:], dtype=torch.float64)
    for i in range(rows.shape[0]):
        for g in range(rows.shape[1]):
            if weights[i, g] == 0:
                continue
            for c in range(x.shape[1]):
                out[i, c] += weights[i, g] * (x[int(rows[i, g]), c] * q - mean[c]) / std[c]
    return out


def _check_against_reference(backend: str, device: str, case: tuple, in_dtype: torch.dtype, out_dtype: torch.dtype,
                             in_fmt: torch.memory_format, out_fmt: torch.memory_format) -> None:
    shape, kind, weights, seed = case
    x = _input(shape, in_dtype, in_fmt, device, seed=seed)
    plan = _plan(shape[0], kind, weights, seed, device)
    executor = FusedMix(*_norm(shape), out_dtype=out_dtype, memory_format=out_fmt, backend=backend)
    got = executor(x, plan)
    want = executor.reference(x, plan)
    assert got.shape == (plan.rows_out, *shape[1:])
    assert got.dtype == out_dtype and got.device == x.device
    assert got.is_contiguous(memory_format=out_fmt)
    torch.testing.assert_close(got, want, **TOL[out_dtype])


# --------------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_is_normalise_then_the_row_sum(case: tuple) -> None:
    shape, kind, weights, seed = case
    x = _input(shape, torch.uint8, torch.contiguous_format, seed=seed)
    plan = _plan(shape[0], kind, weights, seed)
    got = FusedMix(*_norm(shape), backend="torch")(x, plan)
    torch.testing.assert_close(got.double(), _naive_mix(x, plan, *_norm(shape)), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# numba (CPU)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_fmt", FORMATS, ids=["out-nchw", "out-cl"])
@pytest.mark.parametrize("in_fmt", FORMATS, ids=["in-nchw", "in-cl"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_numba_matches_reference(case, in_dtype, out_dtype, in_fmt, out_fmt) -> None:
    _check_against_reference("numba", "cpu", case, in_dtype, out_dtype, in_fmt, out_fmt)


def test_numba_zero_weight_columns_are_not_read() -> None:
    x = _input((8, 3, 6, 5), torch.float32, torch.contiguous_format, seed=2)
    x[4:] = float("nan")  # columns 2 and 3 have weight 0: a kernel that read (or multiplied) them would give NaN
    plan = _plan(8, "group", (0.7, 0.3, 0.0, 0.0), 0)
    executor = FusedMix(*_norm(x.shape), backend="numba")
    got = executor(x, plan)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, executor.reference(x[:4], _plan(4, "group", (0.7, 0.3), 0)))


def test_numba_reads_nhwc_data_through_a_channels_last_view() -> None:
    nhwc = torch.randint(0, 256, (4, 5, 7, 3), dtype=torch.uint8,  # a loader's (N, H, W, C) batch
                         generator=torch.Generator().manual_seed(3))
    view = nhwc.permute(0, 3, 1, 2)  # (N, C, H, W), channels_last, no copy
    assert view.is_contiguous(memory_format=torch.channels_last) and view.data_ptr() == nhwc.data_ptr()
    executor, plan = FusedMix(*_norm(view.shape), backend="numba"), _plan(4, "group", (0.5, 0.5), 0)
    torch.testing.assert_close(executor(view, plan), executor.reference(view.contiguous(), plan))


def test_numba_other_strides_are_copied() -> None:
    x = _input((4, 3, 9, 12), torch.uint8, torch.contiguous_format, seed=4)[:, :, ::2, 1::3]  # neither layout
    executor, plan = FusedMix(*_norm(x.shape), backend="numba"), _plan(4, "permute", (0.25, 0.75), 4)
    torch.testing.assert_close(executor(x, plan), executor.reference(x.contiguous(), plan))


def test_numba_num_threads_gives_the_same_result() -> None:
    x = _input((4, 3, 40, 60), torch.uint8, torch.contiguous_format, seed=5)
    plan = _plan(4, "group", (0.5, 0.5), 0)
    one = FusedMix(*_norm(x.shape), backend="numba", num_threads=1)(x, plan)
    default = FusedMix(*_norm(x.shape), backend="numba")(x, plan)
    assert torch.equal(one, default)


@pytest.mark.skipif(rm.numba is None, reason="numba is not installed")
def test_numba_half_rounding_matches_torch() -> None:
    """The kernel's float32 -> float16/bfloat16 rounding (integer code) against torch's, special values included."""
    specials = np.array([0.0, -0.0, 1.0, -1.5, 65504.0, 65519.99, 65520.0, 1e6, -1e6, np.inf, -np.inf, np.nan,
                         2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -26, 1e-30, 1.0 + 2.0 ** -11,
                         1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 3.4e38], dtype=np.float32)
    rng = np.random.default_rng(0)
    bits = np.concatenate([specials.view(np.uint32), rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32),
                           rng.normal(0, 3, 20000).astype(np.float32).view(np.uint32),
                           (rng.normal(0, 1, 5000) * 1e-5).astype(np.float32).view(np.uint32)])
    values = torch.from_numpy(bits.view(np.float32).copy())
    for bfloat, dtype in ((False, torch.float16), (True, torch.bfloat16)):
        got = np.empty(bits.shape, dtype=np.uint16)
        rm._convert_f32_to_half_bits(bits, got, bfloat)
        got_t = torch.from_numpy(got.view(np.int16)).view(dtype)
        want = values.to(dtype)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got_t), nan)
        assert torch.equal(got_t[~nan].view(torch.int16), want[~nan].view(torch.int16)), dtype


# --------------------------------------------------------------------------------------------------
# Triton (CUDA, or CPU under TRITON_INTERPRET=1 in a subprocess)
# --------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("out_fmt", FORMATS, ids=["out-nchw", "out-cl"])
@pytest.mark.parametrize("in_fmt", FORMATS, ids=["in-nchw", "in-cl"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_matches_reference(case, in_dtype, out_dtype, in_fmt, out_fmt) -> None:
    _check_against_reference("triton", TRITON_DEVICE, case, in_dtype, out_dtype, in_fmt, out_fmt)


@needs_triton
def test_triton_zero_weight_columns_are_not_read() -> None:
    x = _input((8, 3, 6, 5), torch.float32, torch.channels_last, TRITON_DEVICE, seed=6)
    x[:2] = float("nan")  # column 0 has weight 0
    x[4:6] = float("inf")  # column 2 has weight 0
    plan = _plan(8, "group", (0.0, 0.5, 0.0, 0.5), 0, TRITON_DEVICE)
    executor = FusedMix(*_norm(x.shape), backend="triton")
    got = executor(x, plan)
    assert torch.isfinite(got).all()
    want = executor.reference(torch.cat([x[2:4], x[6:8]]), _plan(4, "group", (0.5, 0.5), 0, TRITON_DEVICE))
    torch.testing.assert_close(got, want)


@needs_triton
def test_triton_other_strides_are_copied() -> None:
    x = _input((4, 3, 9, 12), torch.uint8, torch.contiguous_format, TRITON_DEVICE, seed=7)[:, :, ::2, 1::3]
    executor = FusedMix(*_norm(x.shape), backend="triton", memory_format=torch.channels_last)
    plan = _plan(4, "group", (0.25, 0.75), 0, TRITON_DEVICE)
    torch.testing.assert_close(executor(x, plan), executor.reference(x.contiguous(), plan))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (extra `triton`)")
@pytest.mark.skipif(INTERPRET, reason="this is the interpreter subprocess itself")
def test_triton_kernels_under_interpreter() -> None:
    """Run every ``*triton*`` test of this file on CPU under ``TRITON_INTERPRET=1``, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != BACKEND_ENV}
    env["TRITON_INTERPRET"] = "1"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                           "-k", "triton and not under_interpreter and not refuses"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    summary = tail.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail  # every Triton test ran


# --------------------------------------------------------------------------------------------------
# CUDA only
# --------------------------------------------------------------------------------------------------

@needs_cuda
def test_cuda_default_backend_and_imagenet_shape() -> None:
    expected = "triton" if HAS_TRITON else "torch"
    assert resolve_backend("cuda") == expected
    x = _input((64, 3, 224, 224), torch.uint8, torch.contiguous_format, "cuda", seed=8)
    plan = _plan(64, "group", (0.5, 0.25, 0.25, 0.0), 0, "cuda")
    for fmt in FORMATS:
        xi = x.contiguous(memory_format=fmt)
        for dtype in OUT_DTYPES:
            executor = FusedMix(*_norm(x.shape), out_dtype=dtype, memory_format=fmt)
            torch.testing.assert_close(executor(xi, plan), executor.reference(xi, plan), **TOL[dtype])


@needs_cuda
def test_cuda_refuses_numba() -> None:
    with pytest.raises(ValueError, match="numba"):
        FusedMix([0.5] * 3, [0.2] * 3, backend="numba")(torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device="cuda"),
                                                        _plan(2, "group", (0.5, 0.5), 0, "cuda"))


# --------------------------------------------------------------------------------------------------
# Dispatch, caching and input checks
# --------------------------------------------------------------------------------------------------

def test_dispatch_default_env_and_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("cpu") == ("numba" if rm.numba is not None else "torch")
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend("cpu") == "torch"
    assert resolve_backend("cpu", "numba") == "numba"  # the argument wins over the environment
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=f"{BACKEND_ENV}.*'fast'"):
        FusedMix([0.5], [0.2])(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), _plan(2, "group", (0.5, 0.5), 0))


def test_env_backend_torch_gives_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "torch")
    x = _input((4, 3, 5, 5), torch.uint8, torch.contiguous_format, seed=9)
    executor, plan = FusedMix(*_norm(x.shape)), _plan(4, "group", (0.5, 0.5), 0)
    assert executor.resolve("cpu") == "torch" and torch.equal(executor(x, plan), executor.reference(x, plan))


@pytest.mark.skipif(INTERPRET, reason="under TRITON_INTERPRET=1 the triton backend accepts CPU tensors")
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter() -> None:
    with pytest.raises(ValueError, match="triton"):
        FusedMix([0.5] * 3, [0.2] * 3, backend="triton")(torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
                                                         _plan(2, "group", (0.5, 0.5), 0))


def test_the_channel_table_is_made_once_per_device_and_input_kind() -> None:
    executor = FusedMix([0.5] * 3, [0.2] * 3, backend="numba")
    plan = _plan(4, "group", (0.5, 0.5), 0)
    x = _input((4, 3, 5, 5), torch.uint8, torch.contiguous_format, seed=16)
    executor(x, plan)
    table = executor._tables[("cpu:numba", True)]
    executor(x, plan)
    executor(x.float() / 255, plan)
    assert executor._tables[("cpu:numba", True)] is table and len(executor._tables) == 2
    executor.reference(x, plan)
    executor.reference(x, plan)
    assert len(executor._tables) == 3  # the reference's statistics, once


X = torch.zeros(4, 3, 5, 5, dtype=torch.uint8)
M3, S3 = [0.5, 0.5, 0.5], [0.2, 0.2, 0.2]
P2 = MixPlan.uniform(torch.tensor([[0, 1], [2, 3]]), (0.5, 0.5))


@pytest.mark.parametrize("call, error, match", [
    (lambda: FusedMix(M3, S3)(X.numpy(), P2), TypeError, "torch.Tensor"),
    (lambda: FusedMix(M3, S3)(X[0], P2), ValueError, r"\(N, C, H, W\).*\(3, 5, 5\)"),
    (lambda: FusedMix(M3, S3)(X.int(), P2), TypeError, "torch.int32"),
    (lambda: FusedMix(M3, S3, out_dtype=torch.float64), TypeError, "torch.float64"),
    (lambda: FusedMix(M3, S3, memory_format=torch.preserve_format), ValueError, "preserve"),
    (lambda: FusedMix([0.5, 0.5], S3), ValueError, "one value per channel each, got 2 and 3"),
    (lambda: FusedMix([0.5, 0.5], [0.2, 0.2])(X, P2), ValueError, "C=3, got 2"),
    (lambda: FusedMix(M3, [0.2, 0.0, 0.2]), ValueError, "std must be positive"),
    (lambda: FusedMix([0.5, float("nan"), 0.5], S3), ValueError, "finite"),
    (lambda: FusedMix(M3, S3, backend="cuda"), ValueError, "'cuda'"),
    (lambda: FusedMix(M3, S3, num_threads=0), ValueError, "num_threads.*0"),
    (lambda: FusedMix(M3, S3)(X, {"sources": P2.sources}), TypeError, "MixPlan"),
    (lambda: FusedMix(M3, S3)(X, MixPlan.uniform(torch.tensor([[0, 4]]), (0.5, 0.5))), ValueError,
     "reads row 4, outside the batch's 4 rows"),
    (lambda: FusedMix(M3, S3)(X, MixPlan.uniform(torch.tensor([[0, -1]]), (0.5, 0.5))), ValueError, "row -1"),
    (lambda: FusedMix(M3, S3)(X, MixPlan.uniform(torch.tensor([[0, 1]], device="meta"), (0.5, 0.5))), ValueError,
     "plan is on meta"),
], ids=["not-a-tensor", "3d", "int32", "out-float64", "preserve-format", "mean-std-lengths", "channels", "std-zero",
        "mean-nan", "backend-name", "threads", "not-a-plan", "row-above", "row-below", "plan-device"])
def test_bad_inputs_raise_clear_errors(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def test_docstring_examples_run() -> None:
    import doctest

    result = doctest.testmod(rm, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------------------
# One executor, chosen by the caller: the same kernel runs whatever was imported
# --------------------------------------------------------------------------------------------------

_FRESH_PROCESS = """
import sys, torch
from regpipe import Batch, SumMix
from regpipe.kernels import FusedMix
x = torch.randint(0, 256, (8, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(17))
batch = Batch.from_labels(x, torch.arange(8) % 4, 4)
op = SumMix(2, mode="permute", seed=3)
plan = op.draw(batch)
kernel = FusedMix([0.5] * 3, [0.25] * 3, backend="numba")
torch.save({"default": op.apply(batch, plan).inputs, "fused": op.apply(batch, plan, executor=kernel).inputs,
            "loaders": [m for m in sys.modules if m.startswith("regpipe.loaders")]}, sys.argv[1])
"""


@pytest.mark.skipif(rm.numba is None, reason="numba is not installed")
def test_the_same_kernel_runs_whatever_was_imported(tmp_path: Path) -> None:
    """An op's result depends on the executor it is given, never on what the process imported: a fresh process
    that imports nothing of regpipe.loaders gets, bit for bit, what this one (loaders imported) gets."""
    import regpipe.loaders  # noqa: F401 - imported here on purpose: it must change nothing
    from regpipe import Batch, SumMix

    out = tmp_path / "fresh.pt"
    env = {k: v for k, v in os.environ.items() if k != BACKEND_ENV}
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(out)
    assert fresh["loaders"] == []
    x = torch.randint(0, 256, (8, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(17))
    batch = Batch.from_labels(x, torch.arange(8) % 4, 4)
    op = SumMix(2, mode="permute", seed=3)
    plan = op.draw(batch)
    kernel = FusedMix([0.5] * 3, [0.25] * 3, backend="numba")
    assert torch.equal(fresh["default"], op.apply(batch, plan).inputs)  # the torch reference, in both processes
    assert torch.equal(fresh["fused"], op.apply(batch, plan, executor=kernel).inputs)
    assert fresh["default"].max() > 2.0  # the reference mixes uint8 in its 0..255 values: not the normalised kernel
