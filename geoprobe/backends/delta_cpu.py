"""Compiled CPU kernel for the base-point Gromov δ (numba, float64, exact).

With A = [(x|y)_w] the Gromov products at base point w, the base-point δ is

    δ_w = max_{x,y,z} [min(A_xz, A_zy) − A_xy]

(Khrulkov et al. 2020, the (max,min) matrix product of A with itself minus A). The kernel returns the
same float64 number as the plain formula, while skipping every triple that cannot beat the best value
found so far:

* The triple value is symmetric in x and y (A is symmetric), so row x only needs the columns y ≥ x.
* The diagonal y = x contributes max_z A_xz − A_xx ≥ 0, so the running best β starts at ≥ 0 and the
  terms z = x (min(A_xx, A_xy) − A_xy ≤ 0) can be left out. With an exactly symmetric matrix with zero
  diagonal, A_xw = A_wz = 0 exactly: y = w contributes min(A_xz, 0) ≤ 0 and is left out, and z = w
  contributes −A_xy (positive where rounding, or a non-metric input, makes A_xy < 0), taken per row as
  −min_y A_xy before the sorted search.
* min(A_xz, A_zy) − A_xy ≤ A_xz − A_xy, also after rounding (rounding is monotone). Row x visits z in
  decreasing A_xz and keeps the columns y in increasing A_xy; a column can still improve only while
  fl(A_xz − A_xy) > β, a prefix that shrinks as z advances, and the row stops when it is empty.
  Columns with fl(max_z A_xz − A_xy) ≤ β and z with fl(A_xz − min_y A_xy) ≤ β are never sorted or
  visited. Every bound is evaluated in the same float64 arithmetic as the values it bounds.
* While most columns are alive, the row is updated over the contiguous range y ≥ x (vectorised); once
  fewer than 1/``switch`` of them are alive it continues on the sorted prefix only.

Pruning only ever drops a triple whose value is ≤ β ≤ δ_w, and every value compared is computed with the
same float64 operations as the plain formula, so the result equals it exactly. Threads share their best
values through one slot each (no lost updates); the final maximum does not depend on their timing.
"""
from __future__ import annotations

import threading

import numba
import numpy as np
from numba import njit, prange

#: Switch from the contiguous update to the sorted prefix when fewer than 1/SWITCH columns are alive.
SWITCH = 4.0
#: In the contiguous phase, refresh the running best every REFRESH values of z.
REFRESH = 8


@njit(parallel=True, cache=True)
def gromov_product_matrix(dist: np.ndarray, w: int) -> np.ndarray:
    """A_xy = ½((d(x,w) + d(y,w)) − d(x,y)), float64, in the order of operations of the reference."""
    n = dist.shape[0]
    out = np.empty((n, n))
    r = dist[w]
    for x in prange(n):
        rx = r[x]
        row = dist[x]
        o = out[x]
        for y in range(n):
            o[y] = 0.5 * ((rx + r[y]) - row[y])
    return out


@njit(cache=True, nogil=True)
def _row_best(A: np.ndarray, x: int, w: int, best: float, switch: float, refresh: int) -> float:
    """max(best, max_{y ≥ x, z} [min(A_xz, A_zy) − A_xy]) for one row x (see the module docstring)."""
    n = A.shape[0]
    Ax = A[x]
    hi_all = -np.inf
    hi = -np.inf
    lo_all = np.inf
    for z in range(n):
        v = Ax[z]
        if v > hi_all:
            hi_all = v
        if v < lo_all:
            lo_all = v
        if z != x and z != w and v > hi:
            hi = v
    diag = hi_all - Ax[x]            # y = x: max_z A_xz − A_xx
    if diag > best:
        best = diag
    via_base = 0.0 - lo_all          # z = w: min(A_xw, A_wy) − A_xy = −A_xy
    if via_base > best:
        best = via_base
    ny = n - x
    ycand = np.empty(ny, dtype=np.int64)
    nyc = 0
    lo = np.inf
    for y in range(x + 1, n):
        if y != w and hi - Ax[y] > best:
            ycand[nyc] = y
            nyc += 1
            if Ax[y] < lo:
                lo = Ax[y]
    if nyc == 0:
        return best
    zcand = np.empty(n, dtype=np.int64)
    nzc = 0
    for z in range(n):
        if z != x and z != w and Ax[z] - lo > best:
            zcand[nzc] = z
            nzc += 1
    if nzc == 0:
        return best
    zkey = np.empty(nzc)
    for k in range(nzc):
        zkey[k] = -Ax[zcand[k]]
    zorder = np.argsort(zkey)
    ykey = np.empty(nyc)
    for k in range(nyc):
        ykey[k] = Ax[ycand[k]]
    yorder = np.argsort(ykey)
    ys = np.empty(nyc)
    yidx = np.empty(nyc, dtype=np.int64)
    for k in range(nyc):
        yidx[k] = ycand[yorder[k]]
        ys[k] = ykey[yorder[k]]

    cnt = nyc
    contiguous = nyc * switch >= ny
    Axs = Ax[x:]
    mc = np.full(ny if contiguous else 0, -np.inf)  # contiguous phase: columns y = x .. n−1
    m = np.full(nyc, -np.inf)                        # sorted phase: columns yidx
    step = 0
    for zi in range(nzc):
        z = zcand[zorder[zi]]
        a = Ax[z]
        while cnt > 0 and a - ys[cnt - 1] <= best:
            cnt -= 1
        if cnt == 0:
            break
        row = A[z]
        if contiguous:
            if cnt * switch >= ny:
                rs = row[x:]
                for k in range(ny):
                    r = rs[k]
                    v = a if a < r else r
                    mk = mc[k]
                    mc[k] = v if v > mk else mk
                step += 1
                if step % refresh == 0:
                    for k in range(ny):
                        d = mc[k] - Axs[k]
                        if d > best:
                            best = d
                continue
            # leave the contiguous phase: take its best and carry its maxima to the sorted columns
            for k in range(ny):
                d = mc[k] - Axs[k]
                if d > best:
                    best = d
            for k in range(nyc):
                m[k] = mc[yidx[k] - x]
            contiguous = False
            while cnt > 0 and a - ys[cnt - 1] <= best:
                cnt -= 1
            if cnt == 0:
                break
        for k in range(cnt):
            r = row[yidx[k]]
            v = a if a < r else r
            if v > m[k]:
                m[k] = v
                d = v - ys[k]
                if d > best:
                    best = d
    if contiguous:
        for k in range(ny):
            d = mc[k] - Axs[k]
            if d > best:
                best = d
    return best


@njit(parallel=True, cache=True)
def fixed_base_delta(A: np.ndarray, w: int, best0: float, switch: float, refresh: int) -> float:
    """max(best0, δ_w) for the symmetric float64 Gromov-product matrix ``A`` at base point ``w``,
    rows spread over threads.

    ``best0`` must be a lower bound of the answer sought (0, or a δ of another base point when the
    maximum over base points is wanted); rows that cannot beat it are skipped.
    """
    n = A.shape[0]
    slots = np.full(numba.config.NUMBA_NUM_THREADS, max(best0, 0.0))
    for i in prange(n):
        # interleave short and long rows (row x has n − x columns) so the threads share the work
        x = i // 2 if i % 2 == 0 else n - 1 - i // 2
        tid = numba.get_thread_id()
        shared = slots.max()
        b = _row_best(A, x, w, shared, switch, refresh)
        if b > slots[tid]:
            slots[tid] = b
    return slots.max()


@njit(cache=True, nogil=True)
def _gromov_into(dist: np.ndarray, w: int, out: np.ndarray) -> None:
    n = dist.shape[0]
    r = dist[w]
    for x in range(n):
        rx = r[x]
        row = dist[x]
        o = out[x]
        for y in range(n):
            o[y] = 0.5 * ((rx + r[y]) - row[y])


@njit(cache=True, nogil=True)
def _base_best(dist: np.ndarray, w: int, buf: np.ndarray, best: float, switch: float,
               refresh: int) -> float:
    """max(best, δ_w) in one thread, the Gromov products written into ``buf``."""
    _gromov_into(dist, w, buf)
    for x in range(dist.shape[0]):
        best = _row_best(buf, x, w, best, switch, refresh)
    return best


@njit(cache=True, nogil=True)
def delta_serial(dist: np.ndarray, bases: np.ndarray, best0: float, switch: float,
                 refresh: int) -> float:
    """max(best0, max over w in ``bases`` of δ_w), one thread (small inputs: no thread start-up)."""
    n = dist.shape[0]
    buf = np.empty((n, n))
    best = max(best0, 0.0)
    for w in bases:
        best = _base_best(dist, w, buf, best, switch, refresh)
    return best


@njit(parallel=True, cache=True)
def delta_bases_parallel(dist: np.ndarray, bases: np.ndarray, best0: float, switch: float,
                         refresh: int) -> float:
    """max(best0, max over w in ``bases`` of δ_w), base points spread over threads (one n × n buffer
    per base point in flight)."""
    n = dist.shape[0]
    slots = np.full(numba.config.NUMBA_NUM_THREADS, max(best0, 0.0))
    for i in prange(bases.shape[0]):
        tid = numba.get_thread_id()
        buf = np.empty((n, n))
        b = _base_best(dist, bases[i], buf, slots.max(), switch, refresh)
        if b > slots[tid]:
            slots[tid] = b
    return slots.max()


#: numba's fallback threading layer ("workqueue") aborts on concurrent parallel launches; serialise them.
_LAUNCH = threading.Lock()

#: Below this many points one thread does the work (thread start-up would dominate).
SERIAL_MAX_N = 192
#: Exact mode spreads base points over threads while one n × n buffer per thread stays below this.
PARALLEL_BASES_MAX_BYTES = 256 << 20


def delta_fixed(dist: np.ndarray, base_point: int, best0: float = 0.0) -> float:
    """δ at ``base_point`` of the symmetric, zero-diagonal float64 distance matrix ``dist``."""
    dist = np.ascontiguousarray(dist, dtype=np.float64)
    if dist.shape[0] <= SERIAL_MAX_N:
        return float(delta_serial(dist, np.array([base_point], dtype=np.int64), best0, SWITCH, REFRESH))
    with _LAUNCH:
        A = gromov_product_matrix(dist, base_point)
        return float(fixed_base_delta(A, base_point, best0, SWITCH, REFRESH))


def delta_exact(dist: np.ndarray, first: int = 0) -> float:
    """Four-point δ = max over every base point w of δ_w; each base starts from the best so far."""
    n = dist.shape[0]
    return delta_bases(dist, [first] + [v for v in range(n) if v != first])


def delta_bases(dist: np.ndarray, bases: "list[int] | np.ndarray") -> float:
    """max(0, max over w in ``bases`` of δ_w) (0 for no base): the exact δ restricted to some base
    points, the share of one device or process when the base points are spread over several."""
    dist = np.ascontiguousarray(dist, dtype=np.float64)
    n = dist.shape[0]
    bases = np.asarray(bases, dtype=np.int64)
    if bases.size == 0:
        return 0.0
    first = int(bases[0])
    if n <= SERIAL_MAX_N // 2:
        return float(delta_serial(dist, bases, 0.0, SWITCH, REFRESH))
    # the first base alone gives a lower bound that prunes every later one
    best = delta_fixed(dist, first)
    with _LAUNCH:
        if 8 * n * n <= PARALLEL_BASES_MAX_BYTES:
            old = numba.get_parallel_chunksize()
            numba.set_parallel_chunksize(1)   # bases differ in cost: hand them out one at a time
            try:
                return float(delta_bases_parallel(dist, bases[1:], best, SWITCH, REFRESH))
            finally:
                numba.set_parallel_chunksize(old)
        for w in bases[1:]:
            A = gromov_product_matrix(dist, int(w))
            best = float(fixed_base_delta(A, int(w), best, SWITCH, REFRESH))
        return best
