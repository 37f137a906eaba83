"""Gromov δ through the Triton (max,min) kernel (geoprobe.backends.delta_triton) against the CPU paths.

GPU tests (marked ``gpu``) draw fresh random point sets, sizes that are not multiples of a tile, and
compare (1) the kernel's float32 row maxima with the same quantity formed by torch in float32 (equal:
min and max are exact and the one subtraction is rounded alike), and (2) ``delta()`` on CUDA with the
numba CPU kernel and the plain float64 reference on the same distance matrix (equal). The CPU test runs
the plain Triton kernel under Triton's interpreter when Triton is importable.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from geoprobe.probes.hyperbolicity import _delta_reference, _euclidean, delta, gromov_product
from geoprobe.backends import delta_triton

REPO = Path(__file__).resolve().parents[1]
needs_gpu_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and delta_triton.available("cuda")),
    reason="needs CUDA and Triton (run on the GPU machine: pytest -m gpu)")


def _rng() -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))


def _torch_row_max(A: torch.Tensor, bm: int) -> torch.Tensor:
    """V32_x = max over y ≥ bm·⌊x/bm⌋ of [max_z min(A_xz, A_zy) − A_xy], float32, plain torch."""
    A32 = A.to(torch.float32)
    n = A32.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=A.device)
    for x0 in range(0, n, 64):
        rows = torch.arange(x0, min(n, x0 + 64), device=A.device)
        P = torch.minimum(A32[rows][:, :, None], A32[None, :, :]).amax(dim=1) - A32[rows]
        cols = torch.arange(n, device=A.device)
        keep = cols[None, :] >= ((rows // bm) * bm)[:, None]
        out[rows] = torch.where(keep, P, torch.tensor(float("-inf"), device=A.device)).amax(dim=1)
    return out


@pytest.mark.gpu
@needs_gpu_kernel
@pytest.mark.parametrize("n,bm,gluon", [(77, 64, True), (333, 64, True), (333, 128, True),
                                        (200, 128, False), (130, 64, False)])
def test_row_max_equals_torch_float32(n, bm, gluon):
    rng = _rng()
    X = rng.standard_normal((n, 16)) * rng.uniform(0.5, 3.0, size=16)
    D = _euclidean(X)
    A = torch.from_numpy(gromov_product(D, int(rng.integers(n)))).cuda()
    previous = delta_triton._USE_GLUON
    delta_triton._USE_GLUON = gluon
    try:
        v = delta_triton.row_max_float32(A, bm=bm)
    finally:
        delta_triton._USE_GLUON = previous
    ref = _torch_row_max(A, bm)
    assert v.shape == (n,) and torch.isfinite(v).all()
    assert torch.equal(v, ref)


@pytest.mark.gpu
@needs_gpu_kernel
@pytest.mark.parametrize("n", [150, 701])
def test_fixed_delta_on_cuda_equals_cpu_kernel_and_reference(n):
    rng = _rng()
    X = rng.standard_normal((n, 24))
    X[: n // 3] *= 3.0  # uneven spread: the maximum is not at a symmetric spot
    D = _euclidean(X)
    w = int(rng.integers(n))
    gpu = delta(torch.from_numpy(D).cuda(), distances=True, base_point=w)
    cpu = delta(D, distances=True, base_point=w)
    assert gpu.delta == pytest.approx(cpu.delta, rel=1e-12, abs=1e-15)
    if n <= 200:
        assert gpu.delta == pytest.approx(_delta_reference(D, "fixed", w), rel=1e-12, abs=1e-15)


@pytest.mark.gpu
@needs_gpu_kernel
def test_exact_delta_on_cuda_equals_cpu_kernel():
    rng = _rng()
    D = _euclidean(rng.standard_normal((70, 8)))
    gpu = delta(torch.from_numpy(D).cuda(), distances=True, mode="exact")
    assert gpu.delta == pytest.approx(delta(D, distances=True, mode="exact").delta, rel=1e-12, abs=1e-15)
    assert gpu.delta == pytest.approx(_delta_reference(D, "exact"), rel=1e-12, abs=1e-15)


@pytest.mark.gpu
@needs_gpu_kernel
def test_tree_metric_gives_zero_on_cuda():
    """δ = 0 for a weighted tree: every row ties, all are recomputed in float64."""
    rng = _rng()
    n = 300
    parent = [int(rng.integers(i)) for i in range(1, n)]
    w = rng.uniform(0.1, 2.0, size=n - 1)
    depth_path = [[0]]
    for i in range(1, n):
        depth_path.append(depth_path[parent[i - 1]] + [i])
    dist_root = np.zeros(n)
    for i in range(1, n):
        dist_root[i] = dist_root[parent[i - 1]] + w[i - 1]
    D = np.zeros((n, n))
    for i in range(n):
        pi = set(depth_path[i])
        for j in range(i + 1, n):
            lca = max(v for v in depth_path[j] if v in pi)
            D[i, j] = D[j, i] = dist_root[i] + dist_root[j] - 2 * dist_root[lca]
    r = delta(torch.from_numpy(D).cuda(), distances=True, base_point=int(rng.integers(n)))
    assert abs(r.delta) <= 1e-9 * D.max()
    assert r.delta == pytest.approx(delta(D, distances=True, base_point=r.base_point).delta, abs=1e-12)


_INTERPRETER_SCRIPT = r"""
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from geoprobe.probes.hyperbolicity import _euclidean, gromov_product, _delta_reference
from geoprobe.backends import delta_triton, delta_torch
from tests.test_hyperbolicity_gpu import _torch_row_max
rng = np.random.default_rng(int(sys.argv[2]))
for n in (70, 131):
    D = _euclidean(rng.standard_normal((n, 6)))
    A = torch.from_numpy(gromov_product(D, 1))
    assert torch.equal(delta_triton.row_max_float32(A, bm=64), _torch_row_max(A, 64)), n
    assert delta_torch.delta_fixed_torch(torch.from_numpy(D), 1) == _delta_reference(D, "fixed", 1), n
print("OK")
"""


def test_plain_kernel_under_triton_interpreter():
    try:
        importlib.import_module("triton")
    except Exception as exc:
        pytest.skip(f"Triton is not importable ({exc})")
    env = dict(os.environ, TRITON_INTERPRET="1")
    seed = str(int.from_bytes(os.urandom(4), "little"))
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, str(REPO), seed], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "InterpreterError" in proc.stderr and "Python scalars" in proc.stderr:
        pytest.skip("this Triton's interpreter does not run with the installed numpy")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_too_large_delta_is_refused_before_allocating():
    from geoprobe.errors import InputDataError

    before = torch.cuda.memory_allocated()
    x = torch.randn(300_000, 3, device="cuda")
    with pytest.raises(InputDataError, match="largest set that fits"):
        delta(x)
    del x
    assert torch.cuda.memory_allocated() == before
