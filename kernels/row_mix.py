"""The fused mix: uint8 (or 0..1 float) -> per-channel normalisation -> any mixing plan -> dtype and layout.

Every mixing op of regpipe draws a :class:`~regpipe.core.mix_plan.MixPlan`: output row ``i`` sums rows
``s[i, g]`` of the batch with weights ``w[i, g]`` (group and permutation Sum Augmentation, Simionescu 2020,
"Deep Learning Training Procedure Augmentations", sections 3.3 and 3.5; MixUp, Zhang et al. 2018; partners
across seeds after replication). This module executes a plan on the loader's uint8 batch and normalises in
the same pass, writing float32, float16 or bfloat16, NCHW or channels_last::

    out[i, c] = sum_g w[i, g] * (x[s[i, g], c] * q - mean[c]) / std[c]
              = (q / std[c]) * sum_g w[i, g] x[s[i, g], c]  -  (mean[c] / std[c]) * sum_g w[i, g]

with ``q = 1/255`` for uint8 input and ``q = 1`` for float input (already in 0..1). The kernels accumulate
``sum_g w x`` in float32, then scale and shift once per channel and round once at the store (the bias uses
the row's actual weight sum, so the result equals normalise-then-mix). Columns whose host weight
(``plan.column_weights``) is zero are not read (the GCC weights of the gradual schedule reach zero one
group at a time).

It is the one compiled path, with two backends of the same kernel: Triton (CUDA; CPU tensors under
``TRITON_INTERPRET=1`` for the tests) and numba (CPU, parallel over rows x pixel chunks). Its reference is
the composite ``mix_rows(normalize(x))`` (:func:`regpipe.functional.sum_mix.mix_rows`, the one torch
implementation of the row sum), which is also the ``torch`` backend. The launcher reads no device value on
the host: the plan's rows and weights stay on the device and are read by the kernel itself, and the
per-channel table ``(q / std, mean / std)`` is uploaded once per device by the :class:`FusedMix` that owns it.

Layouts. The input is a ``(N, C, H, W)`` tensor, either contiguous (NCHW) or channels_last (NHWC
memory). A loader that yields plain ``(N, H, W, C)`` tensors passes ``images.permute(0, 3, 1, 2)``:
that is a channels_last ``(N, C, H, W)`` view of the same memory, no copy. Other strides are copied
to contiguous first. The output is allocated in ``memory_format``.

Targets are not mixed here: ``(N, K)`` soft targets are tiny; :func:`~regpipe.ops.sum_mix.mix_batch` mixes
them with :func:`~regpipe.functional.sum_mix.mix_rows` and the same plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from regpipe.core.mix_plan import MixPlan
from regpipe.core.optional import import_optional, require
from regpipe.functional.normalize import normalize
from regpipe.functional.sum_mix import mix_rows
from regpipe.kernels._backend import BACKENDS, resolve_backend

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

__all__ = ["FusedMix", "fused_mix", "default_numba_threads", "OUT_DTYPES"]

OUT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
_IN_DTYPES = (torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last)


# --------------------------------------------------------------------------------------------------
# Checks (host values only: shapes, dtypes, devices, the normalisation)
# --------------------------------------------------------------------------------------------------

def _check_normalisation(mean: Sequence[float] | torch.Tensor,
                         std: Sequence[float] | torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean``/``std`` as host floats: one value per channel each, finite, ``std > 0`` (checked once, when the
    executor is made)."""
    values = []
    for name, v in (("mean", mean), ("std", std)):
        flat = torch.as_tensor(v, dtype=torch.float64).detach().cpu().flatten().tolist()
        if not flat:
            raise ValueError(f"{name} must hold one value per channel, got none")
        values.append(tuple(float(f) for f in flat))
    mean_t, std_t = values
    if len(mean_t) != len(std_t):
        raise ValueError(f"mean/std must have one value per channel each, got {len(mean_t)} and {len(std_t)}")
    if not all(math.isfinite(v) for v in mean_t + std_t):
        raise ValueError(f"mean/std must be finite, got {list(mean_t)} and {list(std_t)}")
    if any(v <= 0 for v in std_t):
        raise ValueError(f"std must be positive, got {list(std_t)}")
    return mean_t, std_t


def _check_input(x: torch.Tensor, plan: MixPlan, channels: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W) (NHWC data as a channels_last view: images.permute(0, 3, 1, 2)), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype not in _IN_DTYPES:
        raise TypeError(f"x must be uint8 (0..255) or floating point (0..1), got {x.dtype}")
    # Float input is not range-checked here: a check reads the whole batch (min, max, isfinite), three times
    # the kernel's own single pass. The loaders refuse 0..255 floats where a batch enters (BatchBuilder).
    if x.shape[1] != channels:
        raise ValueError(f"mean/std must have one value per channel: C={x.shape[1]}, got {channels}")
    if not isinstance(plan, MixPlan):
        raise TypeError(f"plan must be a MixPlan, got {type(plan).__name__}")
    if plan.device != x.device:
        raise ValueError(f"the plan is on {plan.device}, x on {x.device}")
    plan.check_rows(x.shape[0])  # host plans only: reading a device plan would synchronise


def _active(plan: MixPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N_out, k_active)`` rows and float32 weights of the columns an executor must read (zero host weights
    dropped), as views when the active columns are a prefix (the gradual schedule's) and without reading any
    device value."""
    active = plan.active_columns()
    if active == list(range(len(active))):
        return plan.sources[:, :len(active)], plan.weights[:, :len(active)].float()
    return (torch.stack([plan.sources[:, g] for g in active], 1),
            torch.stack([plan.weights[:, g] for g in active], 1).float())


def _pixel_stride(x: torch.Tensor) -> int | None:
    """Stride of the merged ``H*W`` axis, or ``None`` when H and W cannot be merged (a copy is needed)."""
    _, _, h, w = x.shape
    if h == 1:
        return x.stride(3)
    if w == 1 or x.stride(2) == w * x.stride(3):
        return x.stride(3) if w > 1 else x.stride(2)
    return None


# --------------------------------------------------------------------------------------------------
# Triton kernel (CUDA; CPU tensors under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _mix_kernel(x_ptr, rows_ptr, w_ptr, table_ptr, out_ptr, C, P, sr_n, sr_k, sw_n, sw_k,
                    sx_n, sx_c, sx_p, so_n, so_c, so_p,
                    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """One program: output row ``program_id(1)``, all channels, ``BLOCK_P`` pixels of the merged H*W axis.

        ``rows_ptr``/``w_ptr``: the plan's ``(N_out, K)`` int64 rows and float32 weights (strides ``sr_*``,
        ``sw_*``); ``table_ptr``: ``(2, C)`` float32 ``[q / std, mean / std]``. Strides are in elements; NCHW has
        ``sx_p == 1``, channels_last ``sx_c == 1`` (Triton specialises strides equal to 1, so both layouts get
        contiguous vector loads)."""
        i = tl.program_id(1)
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        mask = c_ok[:, None] & (offs_p < P)[None, :]
        in_offs = offs_c[:, None] * sx_c + offs_p[None, :] * sx_p
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        total = 0.0
        for j in tl.static_range(K):
            row = tl.load(rows_ptr + i * sr_n + j * sr_k)  # int64: row * sx_n does not overflow at ImageNet sizes
            w = tl.load(w_ptr + i * sw_n + j * sw_k)
            v = tl.load(x_ptr + row * sx_n + in_offs, mask=mask, other=0).to(tl.float32)
            acc += v * w
            total += w
        a = tl.load(table_ptr + offs_c, mask=c_ok, other=0.0)
        b = tl.load(table_ptr + C + offs_c, mask=c_ok, other=0.0)
        acc = acc * a[:, None] - total * b[:, None]
        out_offs = i.to(tl.int64) * so_n + offs_c[:, None] * so_c + offs_p[None, :] * so_p
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_triton(x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, table: torch.Tensor,
                   out: torch.Tensor) -> None:
    """Set the grid and launch :func:`_mix_kernel` (every tensor on ``x``'s device; nothing read here)."""
    if triton is None or tl is None:  # resolve_backend refuses a missing Triton; this says why it is unusable
        require("triton.language", needed_by="the triton kernel backend")
    _, c, h, w = x.shape
    sx_p, so_p = _pixel_stride(x), _pixel_stride(out)
    if sx_p is None:
        x = x.contiguous()
        sx_p = 1
    assert so_p is not None  # out is allocated contiguous or channels_last
    block_c = triton.next_power_of_2(c)
    # 4096 elements (16 KiB of float32 accumulators) per program: a BLOCK_P of 1024 pixels for C = 3/4.
    block_p = max(16, min(1024, triton.next_power_of_2(h * w), 4096 // block_c))
    grid = (triton.cdiv(h * w, block_p), out.shape[0])
    _mix_kernel[grid](x, rows, weights, table, out, c, h * w, rows.stride(0), rows.stride(1),
                      weights.stride(0), weights.stride(1), x.stride(0), x.stride(1), sx_p,
                      out.stride(0), out.stride(1), so_p, K=rows.shape[1], BLOCK_C=block_c, BLOCK_P=block_p)


# --------------------------------------------------------------------------------------------------
# numba kernel (CPU)
# --------------------------------------------------------------------------------------------------

# Pixels per task: the task's C * 2048 float32 values (24 KiB for C = 3: the output run or the scratch)
# stay in the 48 KiB L1 while the k rows are added in; 64x3x224x224 gives 32 rows x 25 chunks = 800 tasks.
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
    def _mix_run(dst: np.ndarray, x: np.ndarray, rows: np.ndarray, weights: np.ndarray, i: int, x0: int, m: int,
                 a: float, b: float, a_rep: np.ndarray, b_rep: np.ndarray, rep: bool) -> None:
        """``dst[:m] = (sum_j w[i, j] x[rows[i, j], x0:x0 + m]) * a - (sum_j w[i, j]) * b`` with scalars ``a, b``
        or, when ``rep``, the elementwise ``a_rep[:m]``, ``b_rep[:m]`` (interleaved channels); the first row
        assigns, the others add, the last scales and shifts."""
        out = dst[:m]
        k = rows.shape[1]
        total = np.float32(0.0)
        for j in range(k):
            total += weights[i, j]
        for j in range(k):
            w = weights[i, j]
            src = x[rows[i, j], x0:x0 + m]
            if j == 0:
                for t in range(m):
                    out[t] = w * np.float32(src[t])
            else:
                for t in range(m):
                    out[t] += w * np.float32(src[t])
        if rep:
            a_run, b_run = a_rep[:m], b_rep[:m]
            for t in range(m):
                out[t] = out[t] * a_run[t] - total * b_run[t]
        else:
            shift = total * b
            for t in range(m):
                out[t] = out[t] * a - shift

    @numba.njit(parallel=True, cache=True)
    def _mix_numba(x: np.ndarray, rows: np.ndarray, weights: np.ndarray, a: np.ndarray, b: np.ndarray,
                   a_rep: np.ndarray, b_rep: np.ndarray, out: np.ndarray, channels: int, in_planar: bool,
                   out_planar: bool, out_mode: int) -> None:
        """``out (N_out, C*P)`` <- mixed rows of ``x (N, C*P)``; each row planar (C, P) or interleaved (P, C).

        Tasks are (output row, chunk of pixels) over ``prange``. A float32 output in the input's layout is
        written directly (a scalar scale and shift per channel for planar rows; for interleaved rows
        ``a_rep``/``b_rep``, the per-channel values repeated along the chunk, so every inner loop is a
        contiguous multiply-add). Otherwise the task mixes into a float32 scratch laid out like the input,
        rounds it to half bits if asked (``out_mode`` 1 = float16, 2 = bfloat16) and writes it in the
        output's layout.
        """
        n = out.shape[0]
        c_count = channels
        p_count = x.shape[1] // c_count
        chunk = a_rep.shape[0] // c_count
        n_chunks = (p_count + chunk - 1) // chunk
        direct = out_mode == 0 and in_planar == out_planar
        for task in numba.prange(n * n_chunks):
            i = task // n_chunks
            p0 = (task % n_chunks) * chunk
            m = min(chunk, p_count - p0)
            if direct:
                if in_planar:
                    for c in range(c_count):
                        _mix_run(out[i, c * p_count + p0:], x, rows, weights, i, c * p_count + p0, m, a[c], b[c],
                                 a_rep, b_rep, False)
                else:
                    _mix_run(out[i, p0 * c_count:], x, rows, weights, i, p0 * c_count, m * c_count, a[0], b[0],
                             a_rep, b_rep, True)
                continue
            s = np.empty(c_count * chunk, dtype=np.float32)
            u = np.empty(c_count * chunk, dtype=np.uint32)  # the half bits (a uint32 array: one loop type)
            if in_planar:  # scratch (C, chunk)
                for c in range(c_count):
                    _mix_run(s[c * chunk:], x, rows, weights, i, c * p_count + p0, m, a[c], b[c], a_rep, b_rep, False)
            else:  # scratch (chunk, C)
                _mix_run(s, x, rows, weights, i, p0 * c_count, m * c_count, a[0], b[0], a_rep, b_rep, True)
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


def _launch_numba(x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, table: np.ndarray,
                  out: torch.Tensor, num_threads: int | None = None) -> None:
    """Run :func:`_mix_numba` on CPU tensors with ``num_threads`` threads (``None``: :func:`default_numba_threads`).

    ``table``: ``(2, C * _CHUNK)`` float32, ``[q / std, mean / std]`` repeated along a chunk (its first ``C``
    columns are the per-channel values)."""
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
    # CPU memory: these numpy arrays are views of the tensors, no copy (and no device to synchronise with)
    args = (_as_numpy(_flat_rows(x.detach(), in_planar)), rows.contiguous().numpy(), weights.contiguous().numpy(),
            table[0, :c], table[1, :c], table[0], table[1], _as_numpy(_flat_rows(out, out_planar)), c,
            in_planar, out_planar, _OUT_MODE[out.dtype])
    if num_threads is None:
        num_threads = default_numba_threads(out.numel())
    previous = numba.get_num_threads()  # numba's setting is per calling thread; restore it
    if num_threads == previous:
        _mix_numba(*args)
        return
    numba.set_num_threads(num_threads)
    try:
        _mix_numba(*args)
    finally:
        numba.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------
# The executor: checks, the per-device tables, dispatch
# --------------------------------------------------------------------------------------------------

class FusedMix:
    """Executes mixing plans on image batches: ``FusedMix(mean, std)(x, plan)`` -> the normalised mix, one pass.

    ``out[i] = sum_g w[i, g] * (x[s[i, g]] * q - mean) / std`` (module docstring), the same as the torch
    reference ``mix_rows(normalize(x, mean, std), plan)`` up to float32 rounding. An executor is made once
    (e.g. by a loader's :class:`~regpipe.loaders.common.BatchBuilder`) and called per batch: it checks and
    keeps the normalisation, uploads its per-channel table once per device and input kind, and reads nothing
    back from the device per call.

    Args:
        mean, std: ``(C,)`` per-channel normalisation in the 0..1 scale; ``std > 0`` (``mean = 0, std = 1/255``
            keeps 0..255 values; ``mean = 0, std = 1`` mixes 0..1 or already normalised floats as they are).
        out_dtype: float32 (default), float16 or bfloat16 (accumulation is float32 in every case).
        memory_format: of the output: ``torch.contiguous_format`` (NCHW) or ``torch.channels_last``.
        backend: ``"triton"``, ``"numba"``, ``"torch"``, or ``None`` for ``$REGPIPE_KERNEL_BACKEND`` or the
            device default (CUDA: triton, CPU: numba, else torch), resolved per call from the input's device.
        num_threads: numba backend only: threads of the parallel loop (default:
            :func:`default_numba_threads`: one per 2**22 output elements, at most torch's
            ``get_num_threads()``). The mix is memory-bound; see the note at ``_MIN_ELEMENTS_PER_THREAD``.

    Raises:
        TypeError: ``out_dtype`` is not a float output dtype.
        ValueError: bad mean/std, memory format, backend name or thread count (the value is named).

    Example:
        >>> import torch
        >>> from regpipe.core.mix_plan import MixPlan
        >>> from regpipe.kernels import FusedMix
        >>> x = torch.randint(0, 256, (4, 3, 5, 7), dtype=torch.uint8)
        >>> plan = MixPlan.uniform(torch.tensor([[0, 2], [1, 3]]), (0.75, 0.25))
        >>> out = FusedMix([0.5] * 3, [0.25] * 3, out_dtype=torch.bfloat16)(x, plan)
        >>> out.shape, out.dtype
        (torch.Size([2, 3, 5, 7]), torch.bfloat16)
    """

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor, *,
                 out_dtype: torch.dtype = torch.float32, memory_format: torch.memory_format = torch.contiguous_format,
                 backend: str | None = None, num_threads: int | None = None) -> None:
        self.mean, self.std = _check_normalisation(mean, std)
        if out_dtype not in OUT_DTYPES:
            raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
        if memory_format not in _MEMORY_FORMATS:
            raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, got "
                             f"{memory_format!r}")
        if num_threads is not None:
            limit = numba.config.NUMBA_NUM_THREADS if numba is not None else 1
            if isinstance(num_threads, bool) or not isinstance(num_threads, int) or not 1 <= num_threads <= limit:
                raise ValueError(f"num_threads must be an integer in [1, {limit}] (NUMBA_NUM_THREADS), got "
                                 f"{num_threads!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        self.out_dtype, self.memory_format = out_dtype, memory_format
        self.backend, self.num_threads = backend, num_threads
        self._tables: dict[tuple[str, bool], torch.Tensor | np.ndarray] = {}

    def resolve(self, device: torch.device | str) -> str:
        """The backend a call on ``device`` runs (see ``backend``)."""
        return resolve_backend(device, self.backend)

    def _table(self, device: torch.device, uint8: bool, chosen: str) -> torch.Tensor | np.ndarray:
        """``(2, C)`` float32 ``[q / std, mean / std]`` on ``device`` (numba: ``(2, C * _CHUNK)``, repeated along a
        chunk), made and uploaded once per device, input kind and backend."""
        key = (f"{device}:{chosen}", uint8)
        table = self._tables.get(key)
        if table is None:
            q = 1.0 / 255.0 if uint8 else 1.0
            values = np.array([[q / s for s in self.std], [m / s for m, s in zip(self.mean, self.std)]],
                              dtype=np.float32)
            if chosen == "numba":
                table = np.ascontiguousarray(np.tile(values, (1, _CHUNK)))
            else:  # non-blocking: a blocking host -> device copy would wait for the device's queue
                table = torch.from_numpy(values).to(device, non_blocking=True)
            self._tables[key] = table
        return table

    def reference(self, x: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """The eager composite the kernels are tested against (and the ``torch`` backend): ``normalize`` in
        float32, :func:`~regpipe.functional.sum_mix.mix_rows` in float32, one cast to ``out_dtype`` and
        ``memory_format``."""
        _check_input(x, plan, len(self.mean))
        key = (f"{x.device}:torch", False)
        stats = self._tables.get(key)
        if stats is None:  # (2, C) mean and std, uploaded once per device like the kernels' table
            stats = self._tables[key] = torch.tensor([self.mean, self.std], dtype=torch.float32).to(
                x.device, non_blocking=True)
        xn = normalize(x, stats[0], stats[1], dtype=torch.float32)
        return mix_rows(xn, plan).to(dtype=self.out_dtype, memory_format=self.memory_format)

    def __call__(self, x: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """``(N, C, H, W)`` uint8 (0..255) or float (0..1), contiguous or channels_last, and a plan on its device
        -> ``(plan.rows_out, C, H, W)`` of ``out_dtype`` in ``memory_format`` on ``x``'s device.

        Raises:
            TypeError, ValueError: a bad input (named); a host plan reading rows outside the batch.
        """
        _check_input(x, plan, len(self.mean))
        chosen = self.resolve(x.device)
        if chosen == "torch":
            return self.reference(x, plan)
        out = torch.empty((plan.rows_out, *x.shape[1:]), dtype=self.out_dtype, device=x.device,
                          memory_format=self.memory_format)
        if out.numel() == 0:
            return out
        rows, weights = _active(plan)
        table = self._table(x.device, x.dtype == torch.uint8, chosen)
        if chosen == "triton":
            _launch_triton(x, rows, weights, table, out)
        else:
            _launch_numba(x, rows, weights, table, out, self.num_threads)
        return out


def fused_mix(x: torch.Tensor, plan: MixPlan, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor, *, out_dtype: torch.dtype = torch.float32,
              memory_format: torch.memory_format = torch.contiguous_format, backend: str | None = None,
              num_threads: int | None = None) -> torch.Tensor:
    """One call of :class:`FusedMix` (for a single batch; a loop over batches keeps one executor, which uploads
    its per-channel table once).

    Example:
        >>> import torch
        >>> from regpipe.core.mix_plan import MixPlan
        >>> from regpipe.kernels import fused_mix
        >>> x = torch.randint(0, 256, (4, 3, 5, 7), dtype=torch.uint8)
        >>> plan = MixPlan.uniform(torch.tensor([[0, 2], [1, 3], [2, 0], [3, 1]]), (0.5, 0.5))
        >>> fused_mix(x, plan, mean=[0.5] * 3, std=[0.25] * 3).shape
        torch.Size([4, 3, 5, 7])
    """
    return FusedMix(mean, std, out_dtype=out_dtype, memory_format=memory_format, backend=backend,
                    num_threads=num_threads)(x, plan)
