"""Fused kernels against their torch references (STYLE 7, 8, 10).

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

from regpipe.kernels import BACKEND_ENV, CALLS, fused_group_mix, fused_mix, group_mix_reference, mix_reference, resolve_backend
from regpipe.kernels import group_mix as gm

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

# (shape, weights, drop_remainder, seed): N not a power of 2, odd H/W, C = 1/3/4, several pixel chunks of the
# numba kernel (50 x 50 > 2048), zero-weight groups (trailing, middle, leading), one active group, a remainder.
# Seeds are fixed integers (Python salts the built-in string hash per process), so every run tests the same data.
CASES = [
    ((6, 3, 5, 7), [0.5, 0.5], False, 101),
    ((9, 1, 9, 3), [0.5, 0.3, 0.2], False, 102),
    ((12, 3, 50, 50), [0.5, 0.5, 0.0, 0.0], False, 103),
    ((10, 4, 3, 1), [0.6, 0.0, 0.4], True, 104),
    ((3, 3, 7, 5), [0.0, 1.0, 0.0], False, 105),
]
CASE_IDS = ["6x3x5x7-k2", "9x1x9x3-k3", "12x3x50x50-k4-zeros", "10x4x3x1-k3-remainder", "3x3x7x5-one-group"]


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


def _check_against_reference(backend: str, device: str, shape: tuple[int, ...], weights: list[float], drop: bool,
                             seed: int, in_dtype: torch.dtype, out_dtype: torch.dtype, in_fmt: torch.memory_format,
                             out_fmt: torch.memory_format) -> None:
    x = _input(shape, in_dtype, in_fmt, device, seed=seed)
    mean, std = _norm(shape)
    got = fused_group_mix(x, weights, mean, std, out_dtype=out_dtype, memory_format=out_fmt,
                          drop_remainder=drop, backend=backend)
    want = group_mix_reference(x, weights, mean, std, out_dtype=out_dtype, memory_format=out_fmt, drop_remainder=drop)
    assert got.shape == (shape[0] // len(weights), *shape[1:])
    assert got.dtype == out_dtype and got.device == x.device
    assert got.is_contiguous(memory_format=out_fmt)
    torch.testing.assert_close(got, want, **TOL[out_dtype])


# --------------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------------

def test_reference_is_normalise_then_group_sum() -> None:
    x = _input((6, 3, 4, 5), torch.uint8, torch.contiguous_format, seed=1)
    mean, std = _norm(x.shape)
    w = [0.5, 0.3, 0.2]
    m, s = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1), torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    want = torch.stack([sum(w[g] * ((x[g * 2 + i].double() / 255 - m) / s) for g in range(3)) for i in range(2)])
    torch.testing.assert_close(group_mix_reference(x, w, mean, std), want.float(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# numba (CPU)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_fmt", FORMATS, ids=["out-nchw", "out-cl"])
@pytest.mark.parametrize("in_fmt", FORMATS, ids=["in-nchw", "in-cl"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_numba_matches_reference(case, in_dtype, out_dtype, in_fmt, out_fmt) -> None:
    shape, weights, drop, seed = case
    _check_against_reference("numba", "cpu", shape, weights, drop, seed, in_dtype, out_dtype, in_fmt, out_fmt)


def test_numba_zero_weight_groups_are_not_read() -> None:
    x = _input((8, 3, 6, 5), torch.float32, torch.contiguous_format, seed=2)
    x[4:] = float("nan")  # groups 2 and 3 have weight 0: a kernel that read (or multiplied) them would give NaN
    got = fused_group_mix(x, [0.7, 0.3, 0.0, 0.0], *_norm(x.shape), backend="numba")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, group_mix_reference(x[:4], [0.7, 0.3], *_norm(x.shape)))


def test_numba_reads_nhwc_data_through_a_channels_last_view() -> None:
    nhwc = torch.randint(0, 256, (4, 5, 7, 3), dtype=torch.uint8,  # a loader's (N, H, W, C) batch
                         generator=torch.Generator().manual_seed(3))
    view = nhwc.permute(0, 3, 1, 2)  # (N, C, H, W), channels_last, no copy
    assert view.is_contiguous(memory_format=torch.channels_last) and view.data_ptr() == nhwc.data_ptr()
    got = fused_group_mix(view, [0.5, 0.5], *_norm(view.shape), backend="numba")
    torch.testing.assert_close(got, group_mix_reference(view.contiguous(), [0.5, 0.5], *_norm(view.shape)))


def test_numba_other_strides_are_copied() -> None:
    x = _input((4, 3, 9, 12), torch.uint8, torch.contiguous_format, seed=4)[:, :, ::2, 1::3]  # neither layout
    got = fused_group_mix(x, [0.25, 0.75], *_norm(x.shape), backend="numba")
    torch.testing.assert_close(got, group_mix_reference(x.contiguous(), [0.25, 0.75], *_norm(x.shape)))


def test_numba_num_threads_gives_the_same_result() -> None:
    x = _input((4, 3, 40, 60), torch.uint8, torch.contiguous_format, seed=5)
    one = fused_group_mix(x, [0.5, 0.5], *_norm(x.shape), backend="numba", num_threads=1)
    default = fused_group_mix(x, [0.5, 0.5], *_norm(x.shape), backend="numba")
    assert torch.equal(one, default)


@pytest.mark.skipif(gm.numba is None, reason="numba is not installed")
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
        gm._convert_f32_to_half_bits(bits, got, bfloat)
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
    shape, weights, drop, seed = case
    _check_against_reference("triton", TRITON_DEVICE, shape, weights, drop, seed, in_dtype, out_dtype, in_fmt, out_fmt)


@needs_triton
def test_triton_zero_weight_groups_are_not_read() -> None:
    x = _input((8, 3, 6, 5), torch.float32, torch.channels_last, TRITON_DEVICE, seed=6)
    x[:2] = float("nan")  # group 0 has weight 0
    x[4:6] = float("inf")  # group 2 has weight 0
    got = fused_group_mix(x, [0.0, 0.5, 0.0, 0.5], *_norm(x.shape), backend="triton")
    assert torch.isfinite(got).all()
    want = group_mix_reference(torch.cat([x[2:4], x[6:8]]), [0.5, 0.5], *_norm(x.shape))
    torch.testing.assert_close(got, want)


@needs_triton
def test_triton_other_strides_are_copied() -> None:
    x = _input((4, 3, 9, 12), torch.uint8, torch.contiguous_format, TRITON_DEVICE, seed=7)[:, :, ::2, 1::3]
    got = fused_group_mix(x, [0.25, 0.75], *_norm(x.shape), backend="triton", memory_format=torch.channels_last)
    torch.testing.assert_close(got, group_mix_reference(x.contiguous(), [0.25, 0.75], *_norm(x.shape),
                                                        memory_format=torch.channels_last))


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
    for fmt in FORMATS:
        xi = x.contiguous(memory_format=fmt)
        for dtype in OUT_DTYPES:
            got = fused_group_mix(xi, [0.5, 0.25, 0.25, 0.0], *_norm(x.shape), out_dtype=dtype, memory_format=fmt)
            want = group_mix_reference(xi, [0.5, 0.25, 0.25, 0.0], *_norm(x.shape), out_dtype=dtype, memory_format=fmt)
            torch.testing.assert_close(got, want, **TOL[dtype])


@needs_cuda
def test_cuda_refuses_numba() -> None:
    with pytest.raises(ValueError, match="numba"):
        fused_group_mix(torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device="cuda"), [0.5, 0.5], [0.5] * 3, [0.2] * 3,
                        backend="numba")


# --------------------------------------------------------------------------------------------------
# Dispatch and input checks
# --------------------------------------------------------------------------------------------------

def test_dispatch_default_env_and_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("cpu") == ("numba" if gm.numba is not None else "torch")
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend("cpu") == "torch"
    assert resolve_backend("cpu", "numba") == "numba"  # the argument wins over the environment
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=f"{BACKEND_ENV}.*'fast'"):
        fused_group_mix(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), [0.5, 0.5], [0.5], [0.2])


def test_env_backend_torch_gives_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "torch")
    x = _input((4, 3, 5, 5), torch.uint8, torch.contiguous_format, seed=9)
    assert torch.equal(fused_group_mix(x, [0.5, 0.5], *_norm(x.shape)), group_mix_reference(x, [0.5, 0.5], *_norm(x.shape)))


@pytest.mark.skipif(INTERPRET, reason="under TRITON_INTERPRET=1 the triton backend accepts CPU tensors")
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter() -> None:
    with pytest.raises(ValueError, match="triton"):
        fused_group_mix(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [0.5, 0.5], [0.5] * 3, [0.2] * 3, backend="triton")


X = torch.zeros(4, 3, 5, 5, dtype=torch.uint8)
M3, S3 = [0.5, 0.5, 0.5], [0.2, 0.2, 0.2]


@pytest.mark.parametrize("call, error, match", [
    (lambda: fused_group_mix(X.numpy(), [0.5, 0.5], M3, S3), TypeError, "torch.Tensor"),
    (lambda: fused_group_mix(X[0], [0.5, 0.5], M3, S3), ValueError, r"\(N, C, H, W\).*\(3, 5, 5\)"),
    (lambda: fused_group_mix(X.int(), [0.5, 0.5], M3, S3), TypeError, "torch.int32"),
    (lambda: fused_group_mix(X, [0.5, 0.5], M3, S3, out_dtype=torch.float64), TypeError, "torch.float64"),
    (lambda: fused_group_mix(X, [0.5, 0.5], M3, S3, memory_format=torch.preserve_format), ValueError, "preserve"),
    (lambda: fused_group_mix(X, [0.5, 0.6], M3, S3), ValueError, "sum to 1"),
    (lambda: fused_group_mix(X, [0.5, -0.5, 1.0], M3, S3), ValueError, "non-negative"),
    (lambda: fused_group_mix(X, [1 / 3] * 3, M3, S3), ValueError, "k=3 does not divide the batch size 4"),
    (lambda: fused_group_mix(X, [0.2] * 5, M3, S3), ValueError, "k=5"),
    (lambda: fused_group_mix(X, [0.5, 0.5], [0.5, 0.5], S3), ValueError, "C=3, got 2"),
    (lambda: fused_group_mix(X, [0.5, 0.5], M3, [0.2, 0.0, 0.2]), ValueError, "std must be positive"),
    (lambda: fused_group_mix(X, [0.5, 0.5], [0.5, float("nan"), 0.5], S3), ValueError, "finite"),
    (lambda: fused_group_mix(X, [0.5, 0.5], M3, S3, backend="cuda"), ValueError, "'cuda'"),
    (lambda: fused_group_mix(X, [0.5, 0.5], M3, S3, num_threads=0), ValueError, "num_threads.*0"),
    (lambda: group_mix_reference(X, [0.5, 0.5], M3, S3, out_dtype=torch.int8), TypeError, "torch.int8"),
], ids=["not-a-tensor", "3d", "int32", "out-float64", "preserve-format", "weight-sum", "negative-weight",
        "k-not-dividing", "k-above-N", "mean-length", "std-zero", "mean-nan", "backend-name", "threads", "reference"])
def test_bad_inputs_raise_clear_errors(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def test_kernel_and_reference_share_the_public_group_rows() -> None:
    # The kernel sizes its output with regpipe.functional.sum_mix.group_rows, as sum_mix does.
    from regpipe.functional.sum_mix import group_rows

    assert (group_rows(12, 4), group_rows(10, 3, drop_remainder=True), group_rows(3, 3)) == (3, 3, 1)
    with pytest.raises(ValueError, match="k=3 does not divide the batch size 10"):
        group_rows(10, 3)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        group_rows(4, 0)
    x = _input((10, 3, 4, 4), torch.uint8, torch.contiguous_format, seed=10)
    out = fused_group_mix(x, [0.5, 0.25, 0.25], *_norm(x.shape), drop_remainder=True, backend="numba")
    assert out.shape[0] == group_rows(10, 3, drop_remainder=True)


def test_docstring_examples_run() -> None:
    import doctest

    result = doctest.testmod(gm, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------------------
# fused_mix: any row table (group, permutation, partners across seeds)
# --------------------------------------------------------------------------------------------------

def _tables(n: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    group = torch.arange(n).view(k, n // k).t().contiguous()
    perm = torch.stack([torch.arange(n)] + [torch.randperm(n, generator=g) for _ in range(k - 1)], 1)
    free = torch.randint(0, n, (n // 2, k), generator=g)  # any rows, repeats allowed
    return {"group": group, "permute": perm, "free": free}


def _naive_mix(x: torch.Tensor, rows: torch.Tensor, weights: list[float], mean: list[float],
               std: list[float]) -> torch.Tensor:
    """Per output row and channel, in float64: sum_g w_g (x[rows[i, g], c] * s - mean[c]) / std[c]."""
    s = 1 / 255 if x.dtype == torch.uint8 else 1.0
    out = torch.zeros(rows.shape[0], *x.shape[1:], dtype=torch.float64)
    for i in range(rows.shape[0]):
        for g, w in enumerate(weights):
            if w == 0:
                continue
            for c in range(x.shape[1]):
                out[i, c] += w * (x[int(rows[i, g]), c].double() * s - mean[c]) / std[c]
    return out


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("mode", ["group", "permute", "free"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
def test_fused_mix_matches_a_naive_loop(backend: str, mode: str, out_dtype: torch.dtype, fmt) -> None:
    x = _input((8, 3, 5, 7), torch.uint8, fmt, seed=11)
    weights = [0.5, 0.3, 0.0, 0.2]  # a zero weight (GCC): that column is never read
    rows = _tables(8, 4, seed=12)[mode]
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    got = fused_mix(x, rows, weights, mean, std, out_dtype=out_dtype, memory_format=fmt, backend=backend)
    assert got.dtype == out_dtype and got.is_contiguous(memory_format=fmt) and got.shape == (rows.shape[0], 3, 5, 7)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[out_dtype]
    torch.testing.assert_close(got.double(), _naive_mix(x, rows, weights, mean, std), atol=tol, rtol=tol)
    torch.testing.assert_close(got, mix_reference(x, rows, weights, mean, std, out_dtype=out_dtype, memory_format=fmt),
                               atol=tol, rtol=tol)


def test_fused_mix_skips_zero_weight_rows_and_counts_calls() -> None:
    x = torch.rand(6, 3, 4, 4)
    x[5] = float("nan")  # only read through the zero-weight column
    rows = torch.tensor([[0, 5], [1, 5], [2, 5]])
    before = CALLS["numba"]
    got = fused_mix(x, rows, [1.0, 0.0], [0.0] * 3, [1.0] * 3, backend="numba")
    assert CALLS["numba"] == before + 1
    torch.testing.assert_close(got, x[:3])


def test_fused_group_mix_is_fused_mix_of_the_group_table() -> None:
    x = _input((12, 3, 6, 5), torch.uint8, torch.channels_last, seed=13)
    w, (mean, std) = [0.5, 0.25, 0.25], _norm((12, 3, 6, 5))
    rows = torch.arange(12).view(3, 4).t().contiguous()
    torch.testing.assert_close(fused_mix(x, rows, w, mean, std), fused_group_mix(x, w, mean, std))


@pytest.mark.parametrize("rows, error, match", [
    (torch.tensor([[0, 8]]), ValueError, "row 8, outside"),
    (torch.tensor([[0, -1]]), ValueError, "row -1, outside"),
    (torch.tensor([[0, 1, 2]]), ValueError, "3 columns for 2 weights"),
    (torch.tensor([[0.0, 1.0]]), TypeError, "int64"),
])
def test_fused_mix_bad_tables_are_named(rows, error, match) -> None:
    with pytest.raises(error, match=match):
        fused_mix(torch.zeros(8, 3, 2, 2, dtype=torch.uint8), rows, [0.5, 0.5], [0.0] * 3, [1.0] * 3)


@needs_triton
@pytest.mark.parametrize("mode", ["group", "permute", "free"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
def test_triton_fused_mix_matches_reference(mode: str, fmt) -> None:
    x = _input((8, 3, 5, 7), torch.uint8, fmt, TRITON_DEVICE, seed=14)
    rows = _tables(8, 4, seed=15)[mode]
    weights, mean, std = [0.5, 0.3, 0.0, 0.2], [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    got = fused_mix(x, rows, weights, mean, std, memory_format=fmt, backend="triton")
    torch.testing.assert_close(got.cpu(), mix_reference(x.cpu(), rows, weights, mean, std, memory_format=fmt))
