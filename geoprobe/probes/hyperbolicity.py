"""Gromov δ-hyperbolicity of a point cloud or a distance matrix.

For a base point w the Gromov product is (x|y)_w = ½(d(x,w) + d(y,w) − d(x,y)). With A = [(x|y)_w]
and the (max,min) matrix product (A⊗A)_xy = max_z min(A_xz, A_zy),

    δ_w = max_{x,y} [(A⊗A)_xy − A_xy],        δ_rel = 2δ / diam(X) ∈ [0, 1]

(Gromov 1987; Khrulkov et al. 2020, "Hyperbolic Image Embeddings", CVPR; used per prompt by HypLoRA,
arXiv 2410.04010 §4.2). A tree metric has δ = 0. The base-point value is a 2-approximation of the
four-point δ, δ_w ≤ δ ≤ 2δ_w, and δ = max_w δ_w: for x, y, z, t let S1 ≥ S2 ≥ S3 be the three sums
d(x,y) + d(z,t), d(x,z) + d(y,t), d(x,t) + d(y,z); then δ = max over quadruples of (S1 − S2)/2.

``mode="fixed"`` returns δ_w at ``base_point``; ``mode="exact"`` the maximum over all base points.

Backends (all return the float64 value of the plain formula, checked against :func:`_delta_reference`):

* CPU (numpy arrays, CPU torch tensors): a compiled numba kernel that prunes triples which cannot beat
  the best value so far (``geoprobe.backends.delta_cpu``); no n×n×n array is ever formed.
* CUDA torch tensors: blocked torch operations, float32 search and float64 recomputation of the rows
  that can hold the maximum (``geoprobe.backends.delta_torch``).
* Several devices or processes (``devices=``, ``process_group=``, :mod:`geoprobe.backends.spread`): exact
  mode's base points are dealt to them; each takes the maximum over its own with the backend of its
  device, and the largest is δ — the same float64 number as on one device.

Distances between points are Euclidean, in float64. Random Gaussian points with no hierarchy already
give small δ_rel (distance concentration), so every δ_rel needs a matched null:
:func:`matched_null_delta` draws Gaussian point sets with the data's mean and covariance.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from ..backends.arrays import real_float64
from ..errors import GeoprobeError, InputDataError
from ..profile import DeltaResult

logger = logging.getLogger(__name__)

MODES = ("fixed", "exact")
#: Relative tolerance for the symmetry, sign and diagonal checks of a distance matrix.
DIST_RTOL = 1e-8
#: Pairs with d² below this fraction of ‖a‖² + ‖b‖² (centred) are recomputed from the differences.
REFINE = 1e-3


class DeltaOptionError(GeoprobeError, ValueError):
    """An option of :func:`delta` has a value outside its allowed set."""


# --------------------------------------------------------------------------- input handling
def _torch_tensor(x: Any):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return torch
    return None


def _as_float64_array(x: Any, what: str) -> np.ndarray:
    torch = _torch_tensor(x)
    if torch is not None:
        if x.is_complex():
            raise InputDataError(f"{what} must be real numbers, got a complex tensor")
        arr = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        arr = real_float64(x, what, "a 2-D array")
    return np.ascontiguousarray(arr)


def _check_shape(shape: tuple, distances: bool) -> int:
    what = "distance matrix" if distances else "points"
    if len(shape) != 2:
        hint = "an (n, n) matrix" if distances else "an (n, d) array (n points × d coordinates)"
        raise InputDataError(f"{what} must be {hint}, got shape {tuple(shape)}")
    n = int(shape[0])
    if distances and shape[0] != shape[1]:
        raise InputDataError(f"a distance matrix must be square, got shape {tuple(shape)}; "
                             "pass distances=False for an (n, d) array of points")
    if not distances and shape[1] == 0:
        raise InputDataError("points have no coordinates (shape (n, 0))")
    if n < 4:
        raise InputDataError(f"δ-hyperbolicity needs at least 4 points, got {n}")
    return n


def _check_options(mode: Any, base_point: Any, block: Any, n: int) -> int:
    if mode not in MODES:
        raise DeltaOptionError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(base_point, bool) or not isinstance(base_point, (int, np.integer)):
        raise DeltaOptionError(f"base_point must be a point index (an integer), got {base_point!r}")
    if not 0 <= int(base_point) < n:
        raise DeltaOptionError(f"base_point must lie in [0, {n - 1}] for {n} points, got {base_point}")
    if block is not None and (isinstance(block, bool) or not isinstance(block, (int, np.integer))
                              or block < 1):
        raise DeltaOptionError(f"block must be a positive integer or None, got {block!r}")
    return int(base_point)


def _validated_distances(D: np.ndarray) -> np.ndarray:
    """Check a distance matrix and return it exactly symmetric with a zero diagonal."""
    if not np.isfinite(D).all():
        bad = int((~np.isfinite(D)).sum())
        raise InputDataError(f"the distance matrix holds {bad} NaN or inf entries; repair or drop "
                             "those points first")
    scale = float(np.abs(D).max())
    tol = DIST_RTOL * max(scale, 1e-300)
    asym = float(np.abs(D - D.T).max())
    if asym > tol:
        raise InputDataError(f"the distance matrix is not symmetric (largest |D − Dᵀ| = {asym:.3g}); "
                             "pass a symmetric matrix, e.g. (D + D.T) / 2")
    if float(D.min()) < -tol:
        raise InputDataError(f"the distance matrix has negative entries (smallest {float(D.min()):.3g}); "
                             "distances must be ≥ 0")
    diag = float(np.abs(np.diagonal(D)).max())
    if diag > tol:
        raise InputDataError(f"the distance matrix has a non-zero diagonal (largest |D_ii| = {diag:.3g}); "
                             "every point is at distance 0 from itself")
    out = 0.5 * (D + D.T)
    np.maximum(out, 0.0, out=out)
    np.fill_diagonal(out, 0.0)
    return out


def _check_points(X: np.ndarray) -> None:
    if not np.isfinite(X).all():
        rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise InputDataError(f"{rows.size} of {X.shape[0]} points contain NaN or inf (first rows: "
                             f"{rows[:5].tolist()}); remove or repair them first")


def _require_spread(diameter: float, n: int) -> None:
    if diameter == 0.0:
        raise InputDataError(f"all {n} points are identical (diameter 0); δ is undefined — pass "
                             "distinct points")


def euclidean_distances(x: Any) -> np.ndarray:
    """Euclidean distance matrix of the rows of ``x`` (n × d) in float64.

    Centred Gram expansion d² = ‖a‖² + ‖b‖² − 2a·b (one matrix product); pairs with
    d² < 10⁻³ (‖a‖² + ‖b‖²), where the expansion loses digits, are recomputed from the differences. The
    result is exactly symmetric with a zero diagonal.
    """
    X = _as_float64_array(x, "points")
    if X.ndim != 2 or X.shape[1] == 0:
        raise InputDataError(f"points must be an (n, d) array with d ≥ 1, got shape {X.shape}")
    _check_points(X)
    return _euclidean(X)


def _euclidean(X: np.ndarray) -> np.ndarray:
    Xc = X - X.mean(axis=0)
    sq = np.einsum("ij,ij->i", Xc, Xc)
    D = Xc @ Xc.T
    D *= -2.0
    D += sq[:, None]
    D += sq[None, :]
    # pairs where the expansion loses digits: d² < REFINE (‖a‖² + ‖b‖²) (pre-filtered by a scalar bound)
    ii, jj = np.nonzero(D < 2.0 * REFINE * float(sq.max()))
    keep = (ii < jj) & (D[ii, jj] < REFINE * (sq[ii] + sq[jj]))
    ii, jj = ii[keep], jj[keep]
    np.maximum(D, 0.0, out=D)
    np.sqrt(D, out=D)
    D += D.T          # exactly symmetric (a + b == b + a); halved below
    D *= 0.5
    step = max(1, (1 << 22) // max(1, X.shape[1]))
    for s in range(0, ii.size, step):
        i, j = ii[s:s + step], jj[s:s + step]
        diff = X[i] - X[j]
        exact = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        D[i, j] = exact
        D[j, i] = exact
    np.fill_diagonal(D, 0.0)
    return D


def gromov_product(dist: np.ndarray, base_point: int) -> np.ndarray:
    """A_xy = (x|y)_w = ½((d(x,w) + d(y,w)) − d(x,y)) for the distance matrix ``dist``, w = base_point."""
    r = dist[base_point]
    return 0.5 * ((r[:, None] + r[None, :]) - dist)


# --------------------------------------------------------------------------- reference and fallback
def _fixed_reference(dist: np.ndarray, w: int) -> float:
    A = gromov_product(dist, w)
    best = -np.inf
    for x in range(A.shape[0]):
        prod = np.minimum(A[x][:, None], A).max(axis=0)  # max_z min(A_xz, A_zy), for every y
        best = max(best, float((prod - A[x]).max()))
    return best


def _delta_reference(dist: np.ndarray, mode: str = "fixed", base_point: int = 0) -> float:
    """Plain float64 δ of a distance matrix: the formula row by row, every x, y, z (tests only)."""
    if mode == "fixed":
        return _fixed_reference(dist, base_point)
    return max(_fixed_reference(dist, w) for w in range(dist.shape[0]))


def _fixed_blocked_numpy(dist: np.ndarray, w: int, block: Optional[int] = None,
                         best0: float = 0.0) -> float:
    """δ_w with numpy over blocks of rows, each a (rows, n, n) minimum (no compiled code)."""
    A = gromov_product(dist, w)
    n = A.shape[0]
    b = block or max(1, min(n, (64 << 20) // (8 * n * n)))
    best = best0
    for s in range(0, n, b):
        Ar = A[s:s + b]
        prod = np.minimum(Ar[:, :, None], A[None, :, s:]).max(axis=1)
        best = max(best, float((prod - Ar[:, s:]).max()))
    return best


def _cpu_bases(dist: np.ndarray, bases: list[int], block: Optional[int]) -> tuple[float, str]:
    """max(0, max over w in ``bases`` of δ_w) on the CPU and the backend's name (the compiled kernel,
    or blocked numpy where numba is missing)."""
    try:
        from ..backends import delta_cpu
    except ImportError as exc:  # numba missing or broken: the same value, slower
        logger.warning("numba is unavailable (%s); δ runs in blocked numpy (install numba for speed)",
                       exc)
        best = 0.0
        for w in bases:
            best = _fixed_blocked_numpy(dist, w, block, best)
        return best, "numpy-blocked"
    if len(bases) == 1:
        return delta_cpu.delta_fixed(dist, bases[0]), "numba-cpu"
    return delta_cpu.delta_bases(dist, bases), "numba-cpu"


def _bases(n: int, mode: str, base_point: int) -> list[int]:
    """The base points δ is maximised over: ``base_point`` alone (fixed mode), or every point with
    ``base_point`` first (exact mode)."""
    if mode == "fixed":
        return [base_point]
    return [base_point] + [v for v in range(n) if v != base_point]


def _cpu_delta(dist: np.ndarray, mode: str, base_point: int, block: Optional[int]) -> tuple[float, str]:
    return _cpu_bases(dist, _bases(dist.shape[0], mode, base_point), block)


def _cuda_distances(x, distances: bool):
    """The float64 distance matrix of CUDA points (or the checked matrix itself) on their GPU, after
    checking that δ fits in the free memory."""
    import torch

    from ..backends import delta_torch
    from ..runtime import cuda_free_bytes

    if x.is_complex():
        raise InputDataError("points must be real numbers, got a complex tensor")
    t = x.detach().to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        what = "distance matrix" if distances else "points"
        raise InputDataError(f"the {what} hold NaN or inf entries; repair or drop those points first")
    n = t.shape[0]
    free = cuda_free_bytes(t.device)
    if n * n * CUDA_BYTES_PER_PAIR > free:
        raise InputDataError(cuda_memory_message(n, free))
    try:
        if distances:
            return torch.from_numpy(_validated_distances(t.cpu().numpy())).to(t.device)
        return delta_torch.euclidean_distances_torch(t, refine=REFINE)
    except torch.cuda.OutOfMemoryError:
        raise InputDataError(cuda_memory_message(n, cuda_free_bytes(t.device))) from None


def _cuda_bases(D, bases: list[int], block: Optional[int]) -> float:
    """max(0, max over w in ``bases`` of δ_w) for a float64 distance matrix on a GPU."""
    import torch

    from ..backends import delta_torch
    from ..runtime import cuda_free_bytes

    try:
        if len(bases) == 1:
            return delta_torch.delta_fixed_torch(D, bases[0], block=block)
        return delta_torch.delta_bases_torch(D, bases, block=block)
    except torch.cuda.OutOfMemoryError:
        raise InputDataError(cuda_memory_message(D.shape[0], cuda_free_bytes(D.device))) from None


def _cuda_delta(x, distances: bool, mode: str, base_point: int, block: Optional[int]
                ) -> tuple[float, float, str]:
    D = _cuda_distances(x, distances)
    diam = float(D.max())
    _require_spread(diam, D.shape[0])
    return _cuda_bases(D, _bases(D.shape[0], mode, base_point), block), diam, "torch-cuda"


def _spread_delta(x: Any, distances: bool, base_point: int, block: Optional[int], spread: Any
                  ) -> tuple[float, float, str]:
    """Exact δ with the base points dealt to the parts of ``spread`` (part j takes every P-th base
    point, starting at the j-th of ``base_point``, then 0, 1, …): the distance matrix as one device
    would form it on the home device, each part's maximum on its device, the largest of them. Every
    δ_w is the float64 value of the plain formula, so the maximum equals one device's."""
    import torch

    home = spread.home
    if home.type == "cuda":
        D = _cuda_distances(torch.as_tensor(x).to(home), distances)
        Dn = None
    else:
        arr = _as_float64_array(x, "distance matrix" if distances else "points")
        if not distances:
            _check_points(arr)
        Dn = _validated_distances(arr) if distances else _euclidean(arr)
        D = torch.from_numpy(Dn)
    diam = float(D.max())
    _require_spread(diam, D.shape[0])
    bases = _bases(D.shape[0], "exact", base_point)
    names: dict[int, str] = {}

    def part(j: int, dev: Any) -> tuple[Any, ...]:
        mine = bases[j::spread.parts]
        if not mine:
            value = 0.0
        elif dev.type == "cuda":
            value, names[j] = _cuda_bases(D.to(dev), mine, block), "torch-cuda"
        else:
            value, names[j] = _cpu_bases(Dn if Dn is not None else D.cpu().numpy(), mine, block)
        return (torch.tensor([value], dtype=torch.float64, device=dev),)

    values = spread.map(part)
    backend = "+".join(sorted(set(names.values()))) or ("torch-cuda" if home.type == "cuda" else "numba-cpu")
    return max(float(v[0][0]) for v in values), diam, f"{backend} ({spread.describe()})"


CUDA_BYTES_PER_PAIR = 48
"""Peak GPU memory of δ per point pair: the float64 distance matrix, its Gram/difference temporaries
and the float64 Gromov-product matrix with its float32 copy (≈ 6 n × n arrays of 8 bytes)."""


def cuda_memory_message(n: int, free_bytes: int) -> str:
    """The error for a δ problem that does not fit: the size asked for, the memory it needs and the
    largest point count that fits (δ needs every pairwise distance at once; it cannot be chunked
    below the n × n matrix)."""
    need = n * n * CUDA_BYTES_PER_PAIR
    fits = max(0, int(math.isqrt(max(0, free_bytes) // CUDA_BYTES_PER_PAIR)))
    return (f"δ on {n:,} points needs about {need / 2 ** 30:.1f} GiB of GPU memory (every pairwise distance "
            f"at once) but {free_bytes / 2 ** 30:.1f} GiB are free; the largest set that fits is about "
            f"{fits:,} points: subsample the points (δ is estimated on samples anyway) or pass a CPU "
            "array to run on the CPU")


# --------------------------------------------------------------------------- public API
def delta(x: Any, *, distances: bool = False, mode: str = "fixed", base_point: int = 0,
          block: Optional[int] = None, devices: Optional[Sequence[Any]] = None,
          process_group: Any = None) -> DeltaResult:
    """Gromov δ-hyperbolicity of points or of a distance matrix.

    Args:
        x: points (n × d; numpy array, torch tensor or nested lists; Euclidean distances in float64),
            or an (n × n) distance matrix when ``distances`` is true (checked: square, symmetric,
            non-negative, zero diagonal, each within a relative tolerance of 1e-8).
        distances: read ``x`` as a distance matrix.
        mode: ``"fixed"`` for δ_w at ``base_point`` (δ_w ≤ δ ≤ 2δ_w), ``"exact"`` for the four-point
            δ = max over all base points.
        base_point: index of the base point w (the first base tried in exact mode).
        block: rows of the (max,min) product formed at once by the torch and numpy paths (default:
            sized from memory); the compiled CPU kernel works row by row and does not use it.
        devices: several devices (``["cuda:0", "cuda:1"]``) to share exact mode's base points, one
            thread each (:mod:`geoprobe.backends.spread`); the distance matrix is formed on the first.
        process_group: ``True`` (the default group) or a ``torch.distributed`` group whose processes
            share exact mode's base points, each on the device of its ``x`` (every process passes the
            same points and gets the same result). Fixed mode, one base point, runs where ``x`` is.

    Returns:
        :class:`DeltaResult` with δ, the diameter, δ_rel = 2δ/diam, and the backend used. CUDA tensors
        run on their GPU; everything else on the CPU. The value is float64 on every backend, and the
        same with ``devices`` or ``process_group`` as on the first device alone.

    Raises:
        InputDataError: NaN/inf, fewer than 4 points, all points identical, or a malformed matrix.
        DeltaOptionError: an unknown ``mode``, a ``base_point`` out of range, or a bad ``block``.
        DeviceError: a device this machine does not have, both ``devices`` and ``process_group``, or
            points that differ between the processes of the group.
    """
    t0 = time.perf_counter()
    if mode not in MODES:
        raise DeltaOptionError(f"mode must be one of {MODES}, got {mode!r}")
    torch = _torch_tensor(x)
    spread = _spread(x, devices, process_group)
    if spread is not None and mode == "exact":
        n = _check_shape(tuple(np.shape(x) if torch is None else x.shape), distances)
        w = _check_options(mode, base_point, block, n)
        value, diam, backend = _spread_delta(x, distances, w, block, spread)
    elif torch is not None and x.is_cuda:
        n = _check_shape(tuple(x.shape), distances)
        w = _check_options(mode, base_point, block, n)
        value, diam, backend = _cuda_delta(x, distances, mode, w, block)
    else:
        arr = _as_float64_array(x, "distance matrix" if distances else "points")
        n = _check_shape(arr.shape, distances)
        w = _check_options(mode, base_point, block, n)
        if distances:
            D = _validated_distances(arr)
        else:
            _check_points(arr)
            D = _euclidean(arr)
        diam = float(D.max())
        _require_spread(diam, n)
        value, backend = _cpu_delta(D, mode, w, block)
    seconds = time.perf_counter() - t0
    logger.debug("δ (%s, n=%d, %s): %.6g in %.3f s", mode, n, backend, value, seconds)
    return DeltaResult(delta=float(value), diameter=diam, delta_rel=2.0 * float(value) / diam,
                       n_points=n, mode=mode, base_point=w if mode == "fixed" else None,
                       backend=backend, dtype="float64", seconds=seconds,
                       dim=0 if distances else int(x.shape[1]))


def _spread(x: Any, devices: Optional[Sequence[Any]], process_group: Any) -> Any:
    """The spread ``devices`` / ``process_group`` ask for (None for neither); the group's processes are
    checked to hold the same points."""
    from ..backends.spread import GroupSpread, spread_for

    torch = _torch_tensor(x)
    device = x.device if torch is not None else None
    spread = spread_for(devices, process_group, device)
    if isinstance(spread, GroupSpread):
        import torch as torch_

        spread.check_same(torch_.as_tensor(np.asarray(x) if torch is None else x), "points")
    return spread


def gaussian_null(x: Any, n_repeats: int = 1, seed: int = 0, *,
                  n_points: Optional[int] = None) -> list[np.ndarray]:
    """Gaussian point sets with the data's mean and (sample) covariance, seeded.

    Each set is μ + Z (X − μ) / √(n − 1) with Z an (m × n) standard normal matrix (m = ``n_points``,
    default n): its rows are independent N(μ, S) with S the sample covariance of X exactly, which
    stays valid when n < d (S has rank ≤ n − 1 and the samples stay in the data's affine span).
    """
    X = _as_float64_array(x, "points")
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] == 0:
        raise InputDataError(f"the Gaussian null needs an (n, d) array with n ≥ 2, got shape {X.shape}")
    _check_points(X)
    if isinstance(n_repeats, bool) or not isinstance(n_repeats, (int, np.integer)) or n_repeats < 1:
        raise DeltaOptionError(f"n_repeats must be a positive integer, got {n_repeats!r}")
    n = X.shape[0]
    m = n if n_points is None else int(n_points)
    if m < 1:
        raise DeltaOptionError(f"n_points must be positive, got {n_points!r}")
    mu = X.mean(axis=0)
    C = (X - mu) / np.sqrt(n - 1)
    rng = np.random.default_rng(seed)
    return [mu + rng.standard_normal((m, n)) @ C for _ in range(int(n_repeats))]


def matched_null_delta(x: Any, *, n_repeats: int = 5, seed: int = 0, mode: str = "fixed",
                       base_point: int = 0) -> list[float]:
    """δ_rel of ``n_repeats`` Gaussian point sets matched to ``x`` (same n and dimension, the data's
    mean and covariance; see :func:`gaussian_null`), seeded; CUDA tensors are measured on their GPU."""
    if mode not in MODES:
        raise DeltaOptionError(f"mode must be one of {MODES}, got {mode!r}")
    torch = _torch_tensor(x)
    out = []
    for sample in gaussian_null(x, n_repeats=n_repeats, seed=seed):
        if torch is not None and x.is_cuda:
            sample = torch.from_numpy(sample).to(x.device)
        out.append(delta(sample, mode=mode, base_point=base_point).delta_rel)
    return out
