"""Gromov δ: the float32 (max,min) search as one Triton kernel (CUDA).

For the base-point matrix A = [(x|y)_w] (n × n, symmetric) the fixed-base δ is
δ_w = max_{x,y} [max_z min(A_xz, A_zy) − A_xy] (Khrulkov et al. 2020). :func:`row_max_float32` returns,
for every row x, V32_x = max over y ≥ BM·⌊x/BM⌋ of [P_xy − A_xy] with P = A ⊗ A formed in float32:

* each program owns one BM × BM tile of (x, y) pairs, tiles with y-block ≥ x-block only (the value is
  symmetric in x and y, so every pair with y ≥ x is seen in row x);
* it loops over z, keeping the running max of min(A_xz, A_zy) for its whole tile in registers; since A
  is symmetric, A_xz is read as A_zx, so step z reads two contiguous pieces of row z;
* at the end it subtracts A_xy and writes the tile's per-row maximum; the host takes the maximum
  over tiles.

Two versions of the same kernel: on CUDA the Gluon one (Triton's explicit-layout dialect), where each
thread owns an 8 × 8 block of the tile, so one z step costs two 16-byte loads per operand for 128
min/max instructions; the plain Triton one (used under the Triton interpreter and where Gluon is
missing) leaves the layout to the compiler, which gives each thread a 32 × 1 strip and about one load
per two min/max. ``GEOPROBE_DELTA_GLUON=0`` forces the plain one, ``GEOPROBE_DELTA_TRITON=0`` switches
the kernel off (torch blocks).

A is copied once into a float32 buffer padded to a multiple of BM with −inf (a padded z contributes
min(−inf, ·) = −inf, which never wins a max), so the inner loop has no masks. The float32 error bound
of :mod:`geoprobe.backends.delta_torch` holds unchanged (rounding A to float32 moves each entry by at most
u·max|A|, min and max are exact, the subtraction adds one rounding): the caller recomputes in float64
the rows that can hold the maximum. Work: n³/2 (min, max) pairs for one base point.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ..runtime import env_flag

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except Exception as _exc:  # ImportError, or a Triton that fails to initialise
    triton = None
    _TRITON_ERROR: Optional[str] = f"{type(_exc).__name__}: {_exc}"
else:
    _TRITON_ERROR = None
try:  # Triton's explicit-layout dialect: the register tile of each thread is set by hand
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except Exception:
    gluon = None

__all__ = ["available", "row_max_float32", "set_enabled", "tile_size"]

#: GEOPROBE_DELTA_TRITON=0: the torch blocks instead of the kernel for the float32 search.
_ENABLED = env_flag("GEOPROBE_DELTA_TRITON", default=True)
#: Use the Gluon kernel (explicit register tiles) where it can run; GEOPROBE_DELTA_GLUON=0 forces the plain
#: Triton one.
_USE_GLUON = env_flag("GEOPROBE_DELTA_GLUON", default=True)


def set_enabled(enabled: bool) -> bool:
    """Use the kernel (True) or the torch blocks (False) for the float32 search; returns the previous
    setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str) -> bool:
    """True when the kernel can run on ``device`` (CUDA with Triton, or CPU under the Triton
    interpreter); ``GEOPROBE_DELTA_TRITON=0`` switches it off."""
    device = torch.device(device)
    if triton is None or not _ENABLED:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def tile_size(n: int) -> int:
    """Tile edge BM for n points: 64 below 4096 points (more tiles to fill the GPU), else 128."""
    return 64 if n < 4096 else 128


_CONFIG = {64: (8, 4), 128: (8, 8)}  # BM → (z steps unrolled per iteration, warps)
# Gluon layout per BM: each thread holds an 8 × 8 block of the tile (8 x values, 8 y values per z step,
# each two 16-byte loads), threads_per_warp [4, 8], warps_per_cta as given.
_GLUON_WARPS = {64: (2, 1), 128: (4, 2)}
_TILES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _tiles(nt: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (nt, str(device))
    if key not in _TILES:
        ii, jj = torch.triu_indices(nt, nt, device=device)
        _TILES[key] = (ii.to(torch.int32).contiguous(), jj.to(torch.int32).contiguous())
    return _TILES[key]


def row_max_float32(A: torch.Tensor, *, bm: Optional[int] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """V32 (float32, length n): for each row x, max over y ≥ bm·⌊x/bm⌋ of [max_z min(A_xz, A_zy) − A_xy],
    all in float32. ``A`` must be symmetric (it is read as Aᵀ); any float dtype, on a device where
    :func:`available` holds."""
    if triton is None:
        raise RuntimeError(f"Triton is not importable ({_TRITON_ERROR})")
    n = A.shape[0]
    bm = int(bm or tile_size(n))
    if bm not in _CONFIG:
        raise ValueError(f"tile size must be one of {sorted(_CONFIG)}, got {bm}")
    bz, warps = _CONFIG[bm]
    nt = triton.cdiv(n, bm)
    n_pad = nt * bm
    A32 = torch.full((n_pad, n_pad), float("-inf"), dtype=torch.float32, device=A.device)
    A32[:n, :n] = A
    part = torch.full((nt, n_pad), float("-inf"), dtype=torch.float32, device=A.device)
    tx, ty = _tiles(nt, A.device)
    if gluon is not None and A.device.type == "cuda" and _USE_GLUON:
        wr, wc = _GLUON_WARPS[bm]
        _maxmin_gluon[(tx.numel(),)](A32, part, tx, ty, n, n_pad, BM=bm, BZ=bz, WR=wr, WC=wc,
                                     num_warps=wr * wc)
    else:
        _maxmin_kernel[(tx.numel(),)](A32, part, tx, ty, n, n_pad, BM=bm, BZ=bz, num_warps=warps)
    v = part.amax(dim=0)[:n]
    if out is not None:
        out.copy_(v)
        return out
    return v


if triton is not None:

    @triton.jit
    def _maxmin_kernel(A, OUT, TX, TY, n, n_pad, BM: tl.constexpr, BZ: tl.constexpr):
        pid = tl.program_id(0)
        bx = tl.load(TX + pid)
        by = tl.load(TY + pid)
        xs = bx * BM + tl.arange(0, BM)
        ys = by * BM + tl.arange(0, BM)
        acc = tl.full([BM, BM], float("-inf"), tl.float32)
        px = A + xs  # row z = 0; A[z, x] = A[x, z]
        py = A + ys
        for z0 in range(0, n_pad, BZ):
            for dz in tl.static_range(BZ):
                ax = tl.load(px)[:, None]
                ay = tl.load(py)[None, :]
                acc = tl.maximum(acc, tl.minimum(ax, ay))
                px += n_pad
                py += n_pad
        axy = tl.load(A + tl.cast(xs, tl.int64)[:, None] * n_pad + ys[None, :])
        val = tl.where((ys < n)[None, :], acc - axy, float("-inf"))
        tl.store(OUT + tl.cast(by, tl.int64) * n_pad + xs, tl.max(val, axis=1))


if gluon is not None:

    @gluon.jit
    def _maxmin_gluon(A, OUT, TX, TY, n, n_pad, BM: gl.constexpr, BZ: gl.constexpr, WR: gl.constexpr,
                      WC: gl.constexpr):
        layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 8], threads_per_warp=[4, 8],
                                                warps_per_cta=[WR, WC], order=[1, 0])
        rows: gl.constexpr = gl.SliceLayout(1, layout)
        cols: gl.constexpr = gl.SliceLayout(0, layout)
        pid = gl.program_id(0)
        bx = gl.load(TX + pid)
        by = gl.load(TY + pid)
        xs = bx * BM + gl.arange(0, BM, layout=rows)
        ys = by * BM + gl.arange(0, BM, layout=cols)
        acc = gl.full([BM, BM], float("-inf"), gl.float32, layout)
        row = A  # row z; A[z, x] = A[x, z]
        for z0 in range(0, n_pad, BZ):
            for dz in gl.static_range(BZ):
                ax = gl.load(row + xs)
                ay = gl.load(row + ys)
                acc = gl.maximum(acc, gl.minimum(gl.expand_dims(ax, 1), gl.expand_dims(ay, 0)))
                row += n_pad
        axy = gl.load(A + gl.expand_dims(xs.to(gl.int64) * n_pad, 1) + gl.expand_dims(ys, 0))
        val = gl.where(gl.expand_dims(ys < n, 0), acc - axy, float("-inf"))
        gl.store(OUT + by.to(gl.int64) * n_pad + xs, gl.max(val, axis=1))
