"""Gromov δ with torch tensor operations (any device; used for CUDA tensors).

The base-point δ is δ_w = max_{x,y} [max_z min(A_xz, A_zy) − A_xy] with A = [(x|y)_w] (Khrulkov et al.
2020). Rows x are processed in blocks: the block's (max,min) product is one broadcast minimum of shape
(rows, n, columns) reduced by ``amax``. Only the columns y ≥ the block's first row are formed, since the
value is symmetric in x and y.

**float32 search, float64 answer.** The blocks run in float32 first and give each row's maximum V32
(on CUDA with Triton: one tiled kernel, :mod:`geoprobe.backends.delta_triton`, with the same bound). With
u = 2⁻²⁴ and a = max|A|, rounding A to float32 moves each entry by at most u·a, min and max move their
result by no more than their arguments, and the final subtraction adds at most 2u·a(1 + u); so
|V32 − V| ≤ 4u·a(1 + u), and the search uses e = 6u·a. Let L = max(β, max V32 − e), a lower bound of
the answer max(β, δ_w). Every
row whose V32 + e < L is below L and is dropped; the rest are recomputed in float64 with the same
operations as the plain formula. The returned value therefore equals the float64 reference; when many
rows tie (δ = 0 for a tree metric) all of them are recomputed.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import delta_triton

logger = logging.getLogger(__name__)

_U32 = 2.0 ** -24
#: Largest |A| searched in float32 (beyond it float32 could overflow; float64 is used throughout).
_F32_SAFE = 1e30


def _rows_per_block(n_rows: int, n: int, n_cols: int, itemsize: int, device: torch.device,
                    block: Optional[int]) -> int:
    if block is not None:
        return max(1, min(int(block), n_rows))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 4, 4 << 30)
    else:
        budget = 64 << 20
    return max(1, min(n_rows, budget // max(1, n * n_cols * itemsize)))


def euclidean_distances_torch(x: torch.Tensor, *, refine: float = 1e-3) -> torch.Tensor:
    """Euclidean distance matrix of the rows of ``x`` in float64 on ``x``'s device.

    Centred Gram expansion d² = ‖a‖² + ‖b‖² − 2a·b; pairs with d² < ``refine``·(‖a‖² + ‖b‖²), where the
    expansion loses digits, are recomputed from the differences. The result is exactly symmetric with
    a zero diagonal.
    """
    x64 = x.detach().to(torch.float64)
    xc = x64 - x64.mean(dim=0, keepdim=True)
    sq = (xc * xc).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (xc @ xc.T)
    n = x64.shape[0]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x64.device), diagonal=1)
    close = upper & (d2 < refine * (sq[:, None] + sq[None, :]))
    d = torch.sqrt(torch.clamp(d2, min=0.0))
    ii, jj = torch.nonzero(close, as_tuple=True)
    if ii.numel():
        step = max(1, (1 << 24) // max(1, x64.shape[1]))
        for s in range(0, ii.numel(), step):
            i, j = ii[s:s + step], jj[s:s + step]
            d[i, j] = torch.linalg.vector_norm(x64[i] - x64[j], dim=1)
    d = torch.triu(d, diagonal=1)
    return d + d.T


def gromov_product_torch(dist: torch.Tensor, w: int) -> torch.Tensor:
    """A_xy = ½((d(x,w) + d(y,w)) − d(x,y)) in ``dist``'s dtype."""
    r = dist[w]
    return 0.5 * ((r[:, None] + r[None, :]) - dist)


def _row_max(A: torch.Tensor, rows: torch.Tensor, col0: int) -> torch.Tensor:
    """max_{y ≥ col0} [max_z min(A_xz, A_zy) − A_xy] for each x in ``rows``."""
    Ar = A[rows]
    prod = torch.minimum(Ar[:, :, None], A[None, :, col0:]).amax(dim=1)
    return (prod - Ar[:, col0:]).amax(dim=1)


def delta_fixed_torch(dist: torch.Tensor, base_point: int, *, best0: float = 0.0,
                      block: Optional[int] = None, search_float32: bool = True) -> float:
    """max(best0, δ_w) for the float64 distance matrix ``dist`` (symmetric, zero diagonal), w =
    ``base_point``. ``best0`` must be a lower bound of the answer sought (0 for one base point)."""
    A = gromov_product_torch(dist.to(torch.float64), base_point)
    n = A.shape[0]
    device = A.device
    amax = float(A.abs().max())
    candidates = torch.arange(n, device=device)
    if search_float32 and amax < _F32_SAFE:
        if delta_triton.available(device):  # one tiled kernel (geoprobe.backends.delta_triton)
            v32 = delta_triton.row_max_float32(A)
        else:
            A32 = A.to(torch.float32)
            v32 = torch.empty(n, dtype=torch.float32, device=device)
            b = _rows_per_block(n, n, n, 4, device, block)
            for s in range(0, n, b):
                e_ = min(n, s + b)
                v32[s:e_] = _row_max(A32, torch.arange(s, e_, device=device), s)
            del A32
        err = 6.0 * _U32 * amax + 1e-300
        low = max(best0, float(v32.max()) - err)
        candidates = torch.nonzero(v32.to(torch.float64) + err >= low).flatten()
        logger.debug("float32 search kept %d of %d rows for the float64 pass", candidates.numel(), n)
    best = max(best0, 0.0)
    if candidates.numel() == 0:
        return best
    b = _rows_per_block(candidates.numel(), n, n, 8, device, block)
    for s in range(0, candidates.numel(), b):
        best = max(best, float(_row_max(A, candidates[s:s + b], 0).max()))
    return best


def delta_exact_torch(dist: torch.Tensor, *, first: int = 0, block: Optional[int] = None,
                      search_float32: bool = True) -> float:
    """Four-point δ = max over every base point w of δ_w; each base starts from the best so far."""
    n = dist.shape[0]
    return delta_bases_torch(dist, [first] + [v for v in range(n) if v != first], block=block,
                             search_float32=search_float32)


def delta_bases_torch(dist: torch.Tensor, bases: "list[int]", *, block: Optional[int] = None,
                      search_float32: bool = True) -> float:
    """max(0, max over w in ``bases`` of δ_w), each base starting from the best so far: the exact δ
    restricted to some base points (one device's share when they are spread over several)."""
    best = 0.0
    for w in bases:
        best = delta_fixed_torch(dist, int(w), best0=best, block=block, search_float32=search_float32)
    return best
