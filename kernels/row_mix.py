"""Fused uint8 -> normalised k-group weighted sum: the batch mix of (Gradually Cascading) Sum Augmentation.

Sum Augmentation (Simionescu, "Deep Learning Training Procedure Augmentations", 2020, section 3.3)
replaces a batch of ``N`` rows by ``N / k`` weighted sums of rows taken one from each of ``k`` sum
groups; its gradual variant (section 3.5) uses the GCC weights of
:func:`regpipe.functional.gcc_weights` instead of ``1/k``. This module does that mix and the loader's
per-channel normalisation in one pass over the batch: it reads the uint8 (or float) images of the
groups whose weight is not zero, normalises per channel, forms the group-mode weighted sum and writes
it in float32, float16 or bfloat16, NCHW or channels_last::

    out[i, c] = sum_{g: w_g != 0} w_g * (x[g*n + i, c] * s - mean[c]) / std[c]      n = N // k

with ``s = 1/255`` for uint8 input and ``s = 1`` for float input (already in 0..1). Normalising is
affine, so this is ``sum_g (w_g s / std[c]) * x[g*n + i, c] - (sum_g w_g) mean[c] / std[c]``: the
kernels multiply-add a ``(k_active, C)`` coefficient table and subtract a ``(C,)`` bias (``sum_g w_g``
is 1 up to rounding, but the bias uses the actual sum so that the result equals normalise-then-mix),
accumulating in float32 and rounding once at the store.

Layouts. The input is a ``(N, C, H, W)`` tensor, either contiguous (NCHW) or channels_last (NHWC
memory). A loader that yields plain ``(N, H, W, C)`` tensors passes ``images.permute(0, 3, 1, 2)``:
that is a channels_last ``(N, C, H, W)`` view of the same memory, no copy. Other strides are copied
to contiguous first. The output is allocated in ``memory_format`` (``torch.contiguous_format`` or
``torch.channels_last``).

What is here (one kernel per module): the Triton kernel and its launcher (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``), the numba kernel (CPU, parallel over rows x pixel chunks), the torch
reference (the eager composite: :func:`regpipe.functional.normalize` then
:func:`regpipe.functional.sum_mix`; also the fallback), the input checks and the dispatch
(:func:`kernels._backend.resolve_backend`: ``backend=`` argument, ``$REGPIPE_KERNEL_BACKEND``, device).

Targets are not mixed here: ``(N, K)`` soft targets are tiny; mix them with
:func:`regpipe.functional.sum_mix` (same weights, same group mode).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from regpipe.core.optional import import_optional, require
from regpipe.functional.normalize import normalize
from regpipe.functional.sum_mix import check_weights, group_rows, sum_mix
from regpipe.kernels._backend import resolve_backend

# numba (a core dependency) and triton (the optional `triton` extra): when one is missing or broken here the
# other backends still work, so the import never fails; the launch of its backend then raises require()'s
# error, which says whether the package is missing or installed but failing to import (and why).
try:
    numba = import_optional("numba")
except ImportError:
    numba = None
try:
    triton = import_optional("triton")
    tl = import_optional("triton.language")
except ImportError:
    triton = tl = None

__all__ = ["fused_mix", "mix_reference", "fused_group_mix", "group_mix_reference", "default_numba_threads",
           "OUT_DTYPES", "CALLS"]

#: calls of :func:`fused_mix` (and :func:`fused_group_mix`) per backend that ran, e.g. ``CALLS["numba"]``
CALLS: Counter = Counter()

OUT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
_IN_DTYPES = (torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last)


# --------------------------------------------------------------------------------------------------
# Input checks and the coefficient table (shared by every backend)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """What a backend needs: ``n`` output rows, the ``(n, k_active)`` input rows each output row reads (the
    columns of the active, non-zero-weight components), and the ``(k_active, C)`` coefficients / ``(C,)``
    bias (float64 on the host; the kernels use float32)."""

    n: int
    rows: np.ndarray
    coef: np.ndarray
    bias: np.ndarray


def _check(x: torch.Tensor, weights: torch.Tensor | Sequence[float], mean: torch.Tensor | Sequence[float],
           std: torch.Tensor | Sequence[float], out_dtype: torch.dtype, memory_format: torch.memory_format,
           drop_remainder: bool, grouped: bool = True) -> tuple[list[float], torch.Tensor, torch.Tensor, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W) (NHWC data as a channels_last view: images.permute(0, 3, 1, 2)), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype not in _IN_DTYPES:
        raise TypeError(f"x must be uint8 (0..255) or floating point (0..1), got {x.dtype}")
    # Float input is not range-checked here: a check reads the whole batch (min, max, isfinite), three times
    # the kernel's own single pass. The loaders refuse 0..255 floats where a batch enters (BatchBuilder).
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
    if memory_format not in _MEMORY_FORMATS:
        raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format!r}")
    w = check_weights(weights)
    n = group_rows(x.shape[0], len(w), drop_remainder) if grouped else x.shape[0]
    c = x.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float64).detach().cpu().flatten()
    std_t = torch.as_tensor(std, dtype=torch.float64).detach().cpu().flatten()
    if mean_t.numel() != c or std_t.numel() != c:
        raise ValueError(f"mean/std must have one value per channel: C={c}, got {mean_t.numel()} and {std_t.numel()}")
    if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all()):
        raise ValueError(f"mean/std must be finite, got {mean_t.tolist()} and {std_t.tolist()}")
    if (std_t <= 0).any():
        raise ValueError(f"std must be positive, got {std_t.tolist()}")
    return w, mean_t, std_t, n


def _plan(x: torch.Tensor, w: list[float], mean: torch.Tensor, std: torch.Tensor, n: int) -> _Plan:
    active = [g for g, wg in enumerate(w) if wg != 0.0]  # zero-weight groups are never read
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    wa = np.array([w[g] for g in active], dtype=np.float64)
    inv_std = 1.0 / std.numpy()
    coef = wa[:, None] * (scale * inv_std)[None, :]
    bias = wa.sum() * mean.numpy() * inv_std
    rows = np.arange(len(w) * n, dtype=np.int64).reshape(len(w), n).T[:, active]  # group mode: row g*n + i
    return _Plan(n=n, rows=np.ascontiguousarray(rows), coef=coef, bias=bias)


def _pixel_stride(x: torch.Tensor) -> int | None:
    """Stride of the merged ``H*W`` axis, or ``None`` when H and W cannot be merged (a copy is needed)."""
    _, _, h, w = x.shape
    if h == 1:
        return x.stride(3)
    if w == 1 or x.stride(2) == w * x.stride(3):
        return x.stride(3) if w > 1 else x.stride(2)
    return None


# --------------------------------------------------------------------------------------------------
# Torch reference (the eager composite) -- also the fallback backend
# --------------------------------------------------------------------------------------------------

def group_mix_reference(x: torch.Tensor, weights: torch.Tensor | Sequence[float], mean: torch.Tensor | Sequence[float],
                        std: torch.Tensor | Sequence[float], *, out_dtype: torch.dtype = torch.float32,
                        memory_format: torch.memory_format = torch.contiguous_format,
                        drop_remainder: bool = False) -> torch.Tensor:
    """The eager composite the kernels are tested against: normalise, then the group-mode weighted sum.

    ``normalize(x, mean, std)`` in float32 (the whole batch, as a loader does), then
    ``sum_mix(..., weights)`` in float32 (zero-weight groups skipped), then one cast to ``out_dtype``
    and ``memory_format``.

    Args, Returns: as :func:`fused_group_mix`.
    """
    w, mean_t, std_t, n = _check(x, weights, mean, std, out_dtype, memory_format, drop_remainder)
    xs = x[: n * len(w)]
    xn = normalize(xs, mean_t.float(), std_t.float(), dtype=torch.float32)
    dummy_targets = xn.new_zeros(xn.shape[0], 1)  # sum_mix mixes targets too; the kernel is for images only
    mixed, _ = sum_mix(xn, dummy_targets, w, drop_remainder=drop_remainder)
    return mixed.to(dtype=out_dtype, memory_format=memory_format)


# --------------------------------------------------------------------------------------------------
# Triton kernel (CUDA; CPU tensors under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _group_mix_kernel(x_ptr, rows_ptr, coef_ptr, out_ptr, C, P,
                          sx_n, sx_c, sx_p, so_n, so_c, so_p,
                          K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """One program: output row ``program_id(1)``, all channels, ``BLOCK_P`` pixels of the merged H*W axis.

        ``coef_ptr`` holds the ``(K, C)`` coefficients followed by the ``(C,)`` bias (float32);
        ``rows_ptr`` the ``(n, K)`` input rows of each output row's ``K`` active components (int64). Strides are in
        elements; NCHW has ``sx_p == 1``, channels_last ``sx_c == 1`` (Triton specialises strides equal
        to 1, so both layouts get contiguous vector loads)."""
        i = tl.program_id(1)
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        mask = c_ok[:, None] & (offs_p < P)[None, :]
        in_offs = offs_c[:, None] * sx_c + offs_p[None, :] * sx_p
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(rows_ptr + i * K + j)  # int64: row * sx_n does not overflow at ImageNet batch sizes
            a = tl.load(coef_ptr + j * C + offs_c, mask=c_ok, other=0.0)
            v = tl.load(x_ptr + row * sx_n + in_offs, mask=mask, other=0).to(tl.float32)
            acc += v * a[:, None]
        b = tl.load(coef_ptr + K * C + offs_c, mask=c_ok, other=0.0)
        acc -= b[:, None]
        out_offs = i.to(tl.int64) * so_n + offs_c[:, None] * so_c + offs_p[None, :] * so_p
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_triton(x: torch.Tensor, plan: _Plan, out: torch.Tensor) -> None:
    """Set the grid and launch :func:`_group_mix_kernel` (x and out on the same device; strides checked)."""
    if triton is None or tl is None:  # resolve_backend refuses a missing Triton; this says why it is unusable
        require("triton.language", needed_by="the triton kernel backend")
    _, c, h, w = x.shape
    sx_p, so_p = _pixel_stride(x), _pixel_stride(out)
    if sx_p is None:
        x = x.contiguous()
        sx_p = 1
    assert so_p is not None  # out is allocated contiguous or channels_last
    k = plan.rows.shape[1]
    starts = torch.from_numpy(plan.rows).to(x.device, non_blocking=True)
    table = torch.from_numpy(np.concatenate([plan.coef.ravel(), plan.bias]).astype(np.float32)).to(
        x.device, non_blocking=True)
    block_c = triton.next_power_of_2(c)
    # 4096 elements (16 KiB of float32 accumulators) per program: a BLOCK_P of 1024 pixels for C = 3/4.
    block_p = max(16, min(1024, triton.next_power_of_2(h * w), 4096 // block_c))
    grid = (triton.cdiv(h * w, block_p), plan.n)
    _group_mix_kernel[grid](x, starts, table, out, c, h * w, x.stride(0), x.stride(1), sx_p,
                            out.stride(0), out.stride(1), so_p, K=k, BLOCK_C=block_c, BLOCK_P=block_p)


# --------------------------------------------------------------------------------------------------
# numba kernel (CPU)
# --------------------------------------------------------------------------------------------------

# Pixels per task: the task's C * 2048 float32 values (24 KiB for C = 3: the output run or the scratch)
# stay in the 48 KiB L1 while the k groups are added in; 64x3x224x224 gives 32 rows x 25 chunks = 800 tasks.
_CHUNK = 2048

if numba is not None:

    @numba.njit(cache=True)
    def _f32_to_f16_bits(x: int) -> int:
        """float32 bits -> IEEE half bits, round to nearest even (overflow -> inf, NaN -> quiet NaN)."""
        x = np.uint32(x)
        sign = (x >> np.uint32(16)) & np.uint32(0x8000)
        x = x & np.uint32(0x7FFFFFFF)
        if x >= np.uint32(0x7F800000):
            return sign | (np.uint32(0x7E00) if x > np.uint32(0x7F800000) else np.uint32(0x7C00))
        if x >= np.uint32(0x38800000):  # a normal half; a carry out of the mantissa rounds up to inf
            h = (x - np.uint32(0x38000000)) >> np.uint32(13)
            rem = x & np.uint32(0x1FFF)
            if rem > np.uint32(0x1000) or (rem == np.uint32(0x1000) and (h & np.uint32(1)) != 0):
                h += np.uint32(1)
            return sign | min(h, np.uint32(0x7C00))
        if x <= np.uint32(0x33000000):  # at most half the smallest subnormal (a tie rounds to even 0): +-0
            return sign
        e = x >> np.uint32(23)
        m = (x & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
        shift = np.uint32(126) - e  # 14..24: value = m * 2**(e - 150), the half subnormal unit is 2**-24
        h = m >> shift
        rem = m & ((np.uint32(1) << shift) - np.uint32(1))
        half = np.uint32(1) << (shift - np.uint32(1))
        if rem > half or (rem == half and (h & np.uint32(1)) != 0):
            h += np.uint32(1)
        return sign | h

    @numba.njit(cache=True)
    def _f32_to_bf16_bits(x: int) -> int:
        """float32 bits -> bfloat16 bits, round to nearest even (NaN stays a quiet NaN)."""
        x = np.uint32(x)
        if (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            return (x >> np.uint32(16)) | np.uint32(0x40)
        return (x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)

    @numba.njit(cache=True)
    def _convert_f32_to_half_bits(bits: np.ndarray, out: np.ndarray, bfloat: bool) -> None:
        """Vector form of the two rounding helpers (float32 bits in, uint16 bits out); used by the tests."""
        for t in range(bits.shape[0]):
            out[t] = _f32_to_bf16_bits(bits[t]) if bfloat else _f32_to_f16_bits(bits[t])

    # The loops below index slices with the bare loop variable: numba then emits no negative-index
    # wrap-around, and LLVM vectorises them. Indexing `row[base + t]` instead measured 8 ms vs 0.8 ms for the
    # k = 2 mix of 64x3x224x224 (2 threads): the wrap-around check blocks vectorisation.

    @numba.njit(cache=True)
    def _mix_run(dst: np.ndarray, x: np.ndarray, rows: np.ndarray, i: int, x0: int, m: int, coef: np.ndarray,
                 c: int, b: float, coef_rep: np.ndarray, b_rep: np.ndarray, rep: bool) -> None:
        """``dst[:m] = sum_j a_j * x[rows[i, j], x0:x0 + m] - b`` with ``a_j = coef[j, c]`` or, when ``rep``,
        elementwise ``coef_rep[j, :m]`` and ``b_rep[:m]`` (the first group assigns, the others add)."""
        out = dst[:m]
        for j in range(rows.shape[1]):
            src = x[rows[i, j], x0:x0 + m]
            if rep:
                a_rep = coef_rep[j, :m]
                if j == 0:
                    b_run = b_rep[:m]
                    for t in range(m):
                        out[t] = a_rep[t] * np.float32(src[t]) - b_run[t]
                else:
                    for t in range(m):
                        out[t] += a_rep[t] * np.float32(src[t])
            else:
                a = coef[j, c]
                if j == 0:
                    for t in range(m):
                        out[t] = a * np.float32(src[t]) - b
                else:
                    for t in range(m):
                        out[t] += a * np.float32(src[t])

    @numba.njit(parallel=True, cache=True)
    def _group_mix_numba(x: np.ndarray, rows: np.ndarray, coef: np.ndarray, bias: np.ndarray,
                         coef_rep: np.ndarray, bias_rep: np.ndarray, out: np.ndarray, channels: int,
                         in_planar: bool, out_planar: bool, out_mode: int) -> None:
        """``out (n, C*P)`` <- mixed rows of ``x (N, C*P)``; each row planar (C, P) or interleaved (P, C).

        Tasks are (output row, chunk of pixels) over ``prange``. A float32 output in the input's layout is
        written directly (a scalar coefficient per channel for planar rows; for interleaved rows
        ``coef_rep``/``bias_rep``, the per-channel values repeated along the chunk, so every inner loop is
        a contiguous multiply-add). Otherwise the task mixes into a float32 scratch laid out like the input,
        rounds it to half bits if asked (``out_mode`` 1 = float16, 2 = bfloat16) and writes it in the
        output's layout.
        """
        n = out.shape[0]
        c_count = channels
        p_count = x.shape[1] // c_count
        chunk = coef_rep.shape[1] // c_count
        n_chunks = (p_count + chunk - 1) // chunk
        direct = out_mode == 0 and in_planar == out_planar
        for task in numba.prange(n * n_chunks):
            i = task // n_chunks
            p0 = (task % n_chunks) * chunk
            m = min(chunk, p_count - p0)
            if direct:
                if in_planar:
                    for c in range(c_count):
                        _mix_run(out[i, c * p_count + p0:], x, rows, i, c * p_count + p0, m, coef, c, bias[c],
                                 coef_rep, bias_rep, False)
                else:
                    _mix_run(out[i, p0 * c_count:], x, rows, i, p0 * c_count, m * c_count, coef, 0, bias[0],
                             coef_rep, bias_rep, True)
                continue
            s = np.empty(c_count * chunk, dtype=np.float32)
            u = np.empty(c_count * chunk, dtype=np.uint32)  # the half bits (a uint32 array: one loop type)
            if in_planar:  # scratch (C, chunk)
                for c in range(c_count):
                    _mix_run(s[c * chunk:], x, rows, i, c * p_count + p0, m, coef, c, bias[c],
                             coef_rep, bias_rep, False)
            else:  # scratch (chunk, C)
                _mix_run(s, x, rows, i, p0 * c_count, m * c_count, coef, 0, bias[0], coef_rep, bias_rep, True)
            bits = s.view(np.uint32)
            if out_mode == 1:
                for t in range(bits.shape[0]):
                    u[t] = _f32_to_f16_bits(bits[t])
            elif out_mode == 2:
                for t in range(bits.shape[0]):
                    u[t] = _f32_to_bf16_bits(bits[t])
            o = out[i]
            if in_planar == out_planar:  # here: a half output in the input's layout, contiguous runs
                for c in range(c_count if in_planar else 1):
                    src = u[c * chunk:] if in_planar else u
                    dst = o[c * p_count + p0:] if in_planar else o[p0 * c_count:]
                    for t in range(m if in_planar else m * c_count):
                        dst[t] = src[t]
            elif in_planar:  # planar scratch -> interleaved output
                dst = o[p0 * c_count:]
                for c in range(c_count):
                    src_f, src_u = s[c * chunk:], u[c * chunk:]
                    for t in range(m):
                        dst[t * c_count + c] = src_f[t] if out_mode == 0 else src_u[t]
            else:  # interleaved scratch -> planar output
                for c in range(c_count):
                    dst = o[c * p_count + p0:]
                    for t in range(m):
                        dst[t] = s[t * c_count + c] if out_mode == 0 else u[t * c_count + c]


def _flat_rows(t: torch.Tensor, planar: bool) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C*H*W)`` view in memory order (planar: NCHW, else NHWC)."""
    return t.reshape(t.shape[0], -1) if planar else t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy; float16/bfloat16 as their uint16 bit patterns (numba has no half types)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


_OUT_MODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# Output elements per thread (16 MiB of float32). The kernel is memory-bound: on the quiet 2-core VM one thread
# mixed the 64x3x224x224 k=2 batch (4.8 M outputs) in 0.73 ms, two in 0.78-0.87 ms, so a second thread does not
# pay at this size (and DataLoader workers, where torch runs 1 thread, get 1). Larger batches (ImageNet
# 256 x 3 x 224 x 224) get a thread per 16 MiB, up to torch's thread count.
_MIN_ELEMENTS_PER_THREAD = 1 << 22


def default_numba_threads(out_elements: int) -> int:
    """Threads the numba kernel uses by default: one per 2**22 output elements, at most torch's intra-op
    setting (``torch.get_num_threads()``, 1 in DataLoader workers) and ``NUMBA_NUM_THREADS``."""
    limit = numba.config.NUMBA_NUM_THREADS if numba is not None else 1
    return max(1, min(torch.get_num_threads(), limit, out_elements // _MIN_ELEMENTS_PER_THREAD))


def _launch_numba(x: torch.Tensor, plan: _Plan, out: torch.Tensor, num_threads: int | None = None) -> None:
    """Run :func:`_group_mix_numba` on CPU tensors ``x`` and ``out`` (``out`` contiguous or channels_last)
    with ``num_threads`` threads (``None``: :func:`default_numba_threads`)."""
    if numba is None:  # pragma: no cover - resolve_backend refuses a missing numba; this says why it is unusable
        require("numba", needed_by="the numba kernel backend")
    c = x.shape[1]
    if x.dtype not in (torch.uint8, torch.float32):
        # The kernel reads uint8 and float32 natively (two compiled signatures, not five); float64 and
        # half inputs, rare on a CPU pipeline, are widened/narrowed to float32 first: one extra pass.
        x = x.float()
    if x.is_contiguous():
        in_planar = True
    elif x.is_contiguous(memory_format=torch.channels_last):
        in_planar = False
    else:
        x, in_planar = x.contiguous(), True
    out_planar = out.is_contiguous()
    coef = plan.coef.astype(np.float32)
    bias = plan.bias.astype(np.float32)
    if in_planar:  # unused by the planar branch; typed placeholders of the right shape class
        coef_rep, bias_rep = np.zeros((coef.shape[0], c * _CHUNK), np.float32), np.zeros(c * _CHUNK, np.float32)
    else:
        coef_rep, bias_rep = np.ascontiguousarray(np.tile(coef, (1, _CHUNK))), np.ascontiguousarray(np.tile(bias, _CHUNK))
    args = (_as_numpy(_flat_rows(x.detach(), in_planar)), plan.rows, coef, bias,
            coef_rep, bias_rep, _as_numpy(_flat_rows(out, out_planar)), c, in_planar, out_planar, _OUT_MODE[out.dtype])
    if num_threads is None:
        num_threads = default_numba_threads(out.numel())
    previous = numba.get_num_threads()  # numba's setting is per calling thread; restore it
    if num_threads == previous:
        _group_mix_numba(*args)
        return
    numba.set_num_threads(num_threads)
    try:
        _group_mix_numba(*args)
    finally:
        numba.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------
# Public entry point: checks + dispatch
# --------------------------------------------------------------------------------------------------

def fused_group_mix(x: torch.Tensor, weights: torch.Tensor | Sequence[float], mean: torch.Tensor | Sequence[float],
                    std: torch.Tensor | Sequence[float], *, out_dtype: torch.dtype = torch.float32,
                    memory_format: torch.memory_format = torch.contiguous_format, drop_remainder: bool = False,
                    backend: str | None = None, num_threads: int | None = None) -> torch.Tensor:
    """uint8 (or 0..1 float) batch -> normalised group-mode weighted sum, in one pass.

    ``out[i] = sum_g weights[g] * (x[g*n + i] / 255 - mean) / std`` with ``n = N // k``; groups whose
    weight is 0 are not read. Same result as :func:`group_mix_reference` (normalise, then
    :func:`regpipe.functional.sum_mix`) up to float32 rounding.

    Args:
        x: ``(N, C, H, W)`` uint8 in 0..255, or float32/float64/float16/bfloat16 in 0..1; contiguous or
            channels_last (an NHWC ``(N, H, W, C)`` batch as ``images.permute(0, 3, 1, 2)``).
        weights: ``(k,)`` non-negative, summing to 1; ``k`` must divide ``N`` unless ``drop_remainder``.
        mean, std: ``(C,)`` per-channel normalisation in the 0..1 scale; ``std > 0``.
        out_dtype: float32 (default), float16 or bfloat16 (accumulation is float32 in every case).
        memory_format: of the output: ``torch.contiguous_format`` (NCHW) or ``torch.channels_last``.
        drop_remainder: ignore the last ``N % k`` rows instead of raising.
        backend: ``"triton"``, ``"numba"``, ``"torch"``, or ``None`` for ``$REGPIPE_KERNEL_BACKEND`` or the
            device default (CUDA: triton, CPU: numba, else torch).
        num_threads: numba backend only: threads of the parallel loop (default:
            :func:`default_numba_threads`: one per 2**22 output elements, at most torch's
            ``get_num_threads()``). The mix is memory-bound; see the note at ``_MIN_ELEMENTS_PER_THREAD``.

    Returns:
        ``(N // k, C, H, W)`` tensor of ``out_dtype`` in ``memory_format``, on ``x``'s device.

    Raises:
        TypeError: ``x`` is not a tensor of a supported dtype, or ``out_dtype`` is not a float output dtype.
        ValueError: bad shape, weights, mean/std, memory format, or backend (the value is named).

    Example:
        >>> import torch
        >>> from regpipe.kernels import fused_group_mix
        >>> x = torch.randint(0, 256, (8, 3, 5, 7), dtype=torch.uint8)
        >>> out = fused_group_mix(x, [0.75, 0.25], mean=[0.5] * 3, std=[0.25] * 3, out_dtype=torch.bfloat16)
        >>> out.shape, out.dtype
        (torch.Size([4, 3, 5, 7]), torch.bfloat16)
    """
    w, mean_t, std_t, n = _check(x, weights, mean, std, out_dtype, memory_format, drop_remainder)
    if num_threads is not None:
        limit = numba.config.NUMBA_NUM_THREADS if numba is not None else 1
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or not 1 <= num_threads <= limit:
            raise ValueError(f"num_threads must be an integer in [1, {limit}] (NUMBA_NUM_THREADS), got {num_threads!r}")
    chosen = resolve_backend(x.device, backend)
    CALLS[chosen] += 1
    if chosen == "torch":
        return group_mix_reference(x, w, mean_t, std_t, out_dtype=out_dtype, memory_format=memory_format,
                                   drop_remainder=drop_remainder)
    return _launch(x, _plan(x, w, mean_t, std_t, n), chosen, out_dtype, memory_format, num_threads)


def _launch(x: torch.Tensor, plan: _Plan, chosen: str, out_dtype: torch.dtype, memory_format: torch.memory_format,
            num_threads: int | None) -> torch.Tensor:
    """The ``(plan.n, C, H, W)`` output of ``plan`` on ``x``, computed by the ``chosen`` compiled backend."""
    out = torch.empty((plan.n, *x.shape[1:]), dtype=out_dtype, device=x.device, memory_format=memory_format)
    if out.numel() == 0:
        return out
    if chosen == "triton":
        _launch_triton(x, plan, out)
    else:
        _launch_numba(x, plan, out, num_threads)
    return out


# --------------------------------------------------------------------------------------------------
# Any row table: group, permutation and across-seed modes
# --------------------------------------------------------------------------------------------------

def _check_sources(sources: torch.Tensor, n_rows: int, k: int) -> np.ndarray:
    if not isinstance(sources, torch.Tensor) or sources.dtype != torch.int64 or sources.dim() != 2:
        raise TypeError(f"sources must be a (N_out, k) int64 tensor, got "
                        f"{getattr(sources, 'dtype', type(sources).__name__)} {tuple(getattr(sources, 'shape', ()))}")
    if sources.shape[1] != k:
        raise ValueError(f"sources has {sources.shape[1]} columns for {k} weights")
    table = sources.detach().cpu().numpy()
    if table.size and (table.min() < 0 or table.max() >= n_rows):
        bad = int(table.min()) if table.min() < 0 else int(table.max())
        raise ValueError(f"sources holds row {bad}, outside the batch's {n_rows} rows")
    return table


def mix_reference(x: torch.Tensor, sources: torch.Tensor, weights: torch.Tensor | Sequence[float],
                  mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float], *,
                  out_dtype: torch.dtype = torch.float32,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The eager composite :func:`fused_mix` is tested against: ``normalize`` (float32), then
    ``out[i] = sum_{g: w_g != 0} w_g * xn[sources[i, g]]`` in float32, then one cast.

    Args, Returns: as :func:`fused_mix`.
    """
    w, mean_t, std_t, _ = _check(x, weights, mean, std, out_dtype, memory_format, False, grouped=False)
    table = torch.from_numpy(_check_sources(sources, x.shape[0], len(w))).to(x.device)
    xn = normalize(x, mean_t.float(), std_t.float(), dtype=torch.float32)
    out = None
    for g, wg in enumerate(w):
        if wg == 0.0:
            continue
        part = xn.index_select(0, table[:, g]) * wg
        out = part if out is None else out.add_(part)
    return out.to(dtype=out_dtype, memory_format=memory_format)


def fused_mix(x: torch.Tensor, sources: torch.Tensor, weights: torch.Tensor | Sequence[float],
              mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float], *,
              out_dtype: torch.dtype = torch.float32, memory_format: torch.memory_format = torch.contiguous_format,
              backend: str | None = None, num_threads: int | None = None) -> torch.Tensor:
    """uint8 (or 0..1 float) batch -> per-channel normalisation -> weighted sum of any rows, in one pass.

    The loader's device stage for (Gradually Cascading) Sum Augmentation (Simionescu 2020, sections 3.3
    and 3.5) in every mode::

        out[i, c] = sum_{g: w_g != 0} w_g * (x[sources[i, g], c] * s - mean[c]) / std[c]

    with ``s = 1/255`` for uint8 and 1 for float input: group mode is ``sources[i, g] = g * n + i``
    (:func:`fused_group_mix`), permutation mode ``sources[i, 0] = i``, ``sources[i, g] = pi_g(i)``, and
    mixing after replication any table whose partners come from other seeds. Rows of zero weight are
    never read (the GCC weights of the gradual schedule reach zero one group at a time).

    Args:
        x: ``(N, C, H, W)`` uint8 or 0..1 float, contiguous or channels_last.
        sources: ``(N_out, k)`` int64 rows of ``x`` (any device; read on the host).
        weights: ``(k,)`` non-negative, summing to 1.
        mean, std: ``(C,)`` in the 0..1 scale (``mean = 0, std = 1/255`` keeps 0..255 values).
        out_dtype: float32, float16 or bfloat16 (float32 accumulation).
        memory_format: of the output.
        backend: ``"triton"``, ``"numba"``, ``"torch"`` or ``None`` (``$REGPIPE_KERNEL_BACKEND``, then by device).
        num_threads: numba threads (default :func:`default_numba_threads`).

    Returns:
        ``(N_out, C, H, W)`` of ``out_dtype`` in ``memory_format`` on ``x``'s device.

    Raises:
        TypeError, ValueError: as :func:`fused_group_mix`; ``sources`` of the wrong type, width or range (named).

    Example:
        >>> import torch
        >>> from regpipe.kernels import fused_mix
        >>> x = torch.randint(0, 256, (4, 3, 5, 7), dtype=torch.uint8)
        >>> rows = torch.tensor([[0, 2], [1, 3], [2, 0], [3, 1]])
        >>> fused_mix(x, rows, [0.5, 0.5], mean=[0.5] * 3, std=[0.25] * 3).shape
        torch.Size([4, 3, 5, 7])
    """
    w, mean_t, std_t, _ = _check(x, weights, mean, std, out_dtype, memory_format, False, grouped=False)
    table = _check_sources(sources, x.shape[0], len(w))
    chosen = resolve_backend(x.device, backend)
    CALLS[chosen] += 1
    if chosen == "torch":
        return mix_reference(x, sources, w, mean_t, std_t, out_dtype=out_dtype, memory_format=memory_format)
    active = [g for g, wg in enumerate(w) if wg != 0.0]
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    wa = np.array([w[g] for g in active], dtype=np.float64)
    inv_std = 1.0 / std_t.numpy()
    plan = _Plan(n=table.shape[0], rows=np.ascontiguousarray(table[:, active]),
                 coef=wa[:, None] * (scale * inv_std)[None, :], bias=wa.sum() * mean_t.numpy() * inv_std)
    return _launch(x, plan, chosen, out_dtype, memory_format, num_threads)
