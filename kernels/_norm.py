"""Launch geometry shared by the LayerNorm and RMSNorm Triton kernels.

Rows up to ``MAX_FUSED_N`` live in registers: a program takes a tile of
``BLOCK_M`` rows x ``BLOCK_N`` columns (several short rows per program, so hidden
sizes like 64 don't leave most lanes idle). Longer rows are streamed by one program
per row in ``LOOP_BLOCK_N`` chunks, so no length is ever truncated.

Backward sums dw/db over rows in two deterministic stages: a fixed grid of ``G``
programs each owns a contiguous range of row tiles and writes its partial sums to
row ``pid`` of a [G, N] fp32 buffer (no atomics); the launcher then adds the G rows
in a fixed order. G depends only on M, N and the device, so reruns give the same bits.
"""
import functools

import triton
import triton.language as tl

MAX_FUSED_N = 8192
LOOP_BLOCK_N = 4096
TILE = 4096  # elements per program tile when several rows share one program


def fwd_geometry(N):
    """(single_pass, BLOCK_M, BLOCK_N, num_warps) for rows of length N."""
    if N <= MAX_FUSED_N:
        block_n = triton.next_power_of_2(max(N, 1))
        block_m = max(1, TILE // block_n) if block_n < TILE else 1
        block_m = min(block_m, 64)
        # ~16 fp32 values per thread in the tile, at most 16 warps
        return True, block_m, block_n, max(1, min(16, block_m * block_n // 512))
    return False, 1, LOOP_BLOCK_N, 8


def bwd_geometry(N):
    """Backward keeps more tiles live (x, dy, x_hat, g, dw/db accumulators): half the rows."""
    single, block_m, block_n, warps = fwd_geometry(N)
    if single:
        block_m = max(1, block_m // 2)
        warps = max(1, min(16, block_m * block_n // 256))
    return single, block_m, block_n, warps


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def partial_grid(num_tiles, N, device):
    """(G, tiles_per_program): the number of partial-sum rows for dw/db."""
    # Each program adds its tiles' rows one after another in fp32; enough programs keep
    # that run short (its rounding error grows with it), the second stage is torch's sum.
    if device.type == "cuda":
        g = 4 * _sm_count(device.index if device.index is not None else 0)
    else:
        g = 64  # the interpreter (tests)
    # keep the [G, N] fp32 partials within ~64 MB per parameter for very long rows
    g = max(1, min(g, num_tiles, max(1, (1 << 24) // max(N, 1))))
    tpp = triton.cdiv(num_tiles, g)
    return triton.cdiv(num_tiles, tpp), tpp


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (round to nearest even).

    For bfloat16 the rounding is done on the bits first, then the cast is exact: the
    GPU's own conversion gives the same result, but the Triton interpreter's truncates,
    which would double the error the CPU tests see.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True)).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def load_input(X_ptr, R_ptr, S_ptr, x_off, r_off, s_off, mask, HAS_RES: tl.constexpr, STORE_S: tl.constexpr):
    """The values a norm sees, as fp32: x, or x + r rounded to x's dtype (stored to S when asked)."""
    x = tl.load(X_ptr + x_off, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R_ptr + r_off, mask=mask, other=0.0)
        x = to_dtype(x.to(tl.float32) + r.to(tl.float32), X_ptr.dtype.element_ty)
        if STORE_S:
            tl.store(S_ptr + s_off, x, mask=mask)
    return x.to(tl.float32)
