"""Probes spread over several devices or processes (geoprobe.backends.spread): the exact δ with its base
points dealt to the parts, and the kNN of the intrinsic dimension with its candidate products and
query rows dealt to them, give the numbers of one device — checked on the CPU with device lists
(threads) and with two gloo processes started by torchrun; the neighbour distances also against
brute force (scipy), δ against the plain formula. Devices the machine does not have are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

import geoprobe as gp
from geoprobe.backends.knn_certified import (_Gram, _scaled_points, _symmetric_candidates, _deal_strips,
                                             as_float64_points, distances_at_ranks, distances_at_ranks_spread,
                                             merge_candidates)
from geoprobe.backends.spread import DeviceSpread, parse_devices, share, spread_for
from geoprobe.errors import DeviceError
from geoprobe.probes.hyperbolicity import _delta_reference, euclidean_distances

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _points(n: int, d: int, seed: int) -> np.ndarray:
    """Points on a 4-dimensional linear image with an exact copy, a near copy, and rounded rows that
    tie in distance."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)) @ rng.standard_normal((4, d))
    x[::9] = np.round(x[::9] * 2) / 2
    x[n // 2] = x[3]
    x[n // 3] = x[3] + 1e-12
    return x


# --------------------------------------------------------------------------- δ
@pytest.mark.parametrize("n,parts,base_point", [(40, 2, 0), (97, 3, 5), (150, 4, 149), (300, 2, 7)])
def test_exact_delta_over_devices_is_the_one_device_delta(n, parts, base_point):
    x = np.random.default_rng(n).standard_normal((n, 6))
    one = gp.delta(x, mode="exact", base_point=base_point)
    spread = gp.delta(x, mode="exact", base_point=base_point, devices=["cpu"] * parts)
    assert spread.delta == one.delta and spread.diameter == one.diameter and spread.delta_rel == one.delta_rel
    assert spread.backend == f"numba-cpu ({parts} devices)" and spread.mode == "exact"
    if n <= 100:
        assert spread.delta == _delta_reference(euclidean_distances(x), "exact")
    D = euclidean_distances(x)
    assert gp.delta(D, distances=True, mode="exact", devices=["cpu"] * parts).delta == one.delta


def test_more_devices_than_base_points_and_fixed_mode():
    x = np.random.default_rng(3).standard_normal((5, 3))
    assert gp.delta(x, mode="exact", devices=["cpu"] * 7).delta == gp.delta(x, mode="exact").delta
    fixed = gp.delta(x, mode="fixed", base_point=2, devices=["cpu", "cpu"])  # one base point: one device
    assert fixed.delta == gp.delta(x, mode="fixed", base_point=2).delta and fixed.backend == "numba-cpu"


# --------------------------------------------------------------------------- kNN and intrinsic dimension
def _brute_ranks(x: np.ndarray, ranks: list[int]) -> np.ndarray:
    D = cdist(x, x)
    np.fill_diagonal(D, np.inf)
    D.sort(axis=1)
    return D[:, [r - 1 for r in ranks]]


@pytest.mark.parametrize("n,d,chunk,parts", [(900, 7, 100, 2), (1100, 33, 128, 3), (600, 5, 64, 5),
                                             (700, 12, None, 2), (300, 3, 1000, 4)])
def test_spread_neighbour_distances_equal_one_device_and_brute_force(n, d, chunk, parts):
    x = _points(n, d, seed=n)
    x64 = as_float64_points(x)
    ranks = [1, 2, 5, 11]
    tau = 1e-9 * float(np.sqrt(x.var(axis=0).sum()))
    one, near_one = distances_at_ranks(x64, ranks, tau=tau, chunk=chunk)
    got, near = distances_at_ranks_spread(x64, ranks, DeviceSpread([CPU] * parts), tau=tau, chunk=chunk)
    assert torch.equal(got, one) and torch.equal(near, near_one)
    np.testing.assert_allclose(got.numpy(), _brute_ranks(x, ranks), rtol=1e-12, atol=1e-12)
    D = cdist(x, x)
    earlier = np.array([bool((D[i, :i] <= tau).any()) for i in range(n)])
    assert np.array_equal(near.numpy(), earlier) and earlier.sum() == 2


def test_strip_subsets_merge_into_the_one_device_lists():
    x64 = as_float64_points(np.random.default_rng(1).standard_normal((500, 9)))  # no tied distances
    scaled, _, _ = _scaled_points(x64)
    gram = _Gram(scaled, "float32")
    m, chunk = 12, 64
    full_i, full_v = _symmetric_candidates(gram, m, chunk)
    owned = _deal_strips(500, chunk, 3)
    assert sorted(s for o in owned for s in o) == list(range(0, 500, chunk))
    cost = [sum((min(500, s + chunk) - s) * (500 - s) for s in o) for o in owned]
    assert max(cost) - min(cost) <= chunk * 500  # within one strip's cost
    i, v = merge_candidates([_symmetric_candidates(gram, m, chunk, o) for o in owned], m)
    assert torch.equal(v, full_v)  # the same values per row (indices may differ between ties only)
    assert torch.equal(i.sort(dim=1).values, full_i.sort(dim=1).values)
    assert not (i == torch.arange(500)[:, None]).any()


@pytest.mark.parametrize("estimator", ["twonn", "gride"])
def test_intrinsic_dimension_over_devices_is_the_one_device_estimate(estimator):
    x = _points(1600, 24, seed=7)
    one = gp.intrinsic_dimension(x, estimator=estimator, n_boot=60, seed=3).to_dict()
    two = gp.intrinsic_dimension(x, estimator=estimator, n_boot=60, seed=3, devices=["cpu", "cpu"]).to_dict()
    assert one.pop("backend") == "cpu" and two.pop("backend") == "cpu (2 devices)"
    one.pop("seconds"), two.pop("seconds")
    assert two == one and one["n_duplicates_removed"] == 2
    plain = gp.intrinsic_dimension(np.delete(x, [1600 // 2, 1600 // 3], axis=0), estimator=estimator,
                                   dedup_tol=None, devices=["cpu"] * 3)
    assert plain.dimension == gp.intrinsic_dimension(np.delete(x, [800, 533], axis=0), estimator=estimator,
                                                     dedup_tol=None).dimension


def test_share_cuts_rows_into_contiguous_runs():
    for n in range(0, 11):
        for parts in range(1, 5):
            runs = [share(n, parts, p) for p in range(parts)]
            assert [list(range(n))[r] for r in runs] == [a.tolist() for a in np.array_split(np.arange(n), parts)]


# --------------------------------------------------------------------------- bad input
def test_devices_the_machine_lacks_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="devices asks for cuda:0 but this machine has no GPU"):
        parse_devices(["cuda:0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match=r"devices asks for cuda:2 but this machine has 2 GPUs \(cuda:0 … cuda:1\)"):
        parse_devices(["cuda:0", "cuda:2"])
    assert parse_devices(["cuda", "cuda:1"]) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    for bad, words in (([], "non-empty list"), ("cuda:0", "non-empty list"), (["banana"], "not a device name"),
                       (["meta"], "cpu and cuda")):
        with pytest.raises(DeviceError, match=words):
            parse_devices(bad)
    with pytest.raises(DeviceError, match="not both"):
        spread_for(["cpu"], True)
    with pytest.raises(DeviceError, match="torch.distributed to be initialised"):
        spread_for(None, True)
    x = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(DeviceError, match="this machine has 2 GPUs"):
        gp.delta(x, mode="exact", devices=["cpu", "cuda:5"])
    with pytest.raises(DeviceError, match="not the first of devices"):
        gp.intrinsic_dimension(x, device="cpu", devices=["cuda:1", "cpu"])


# --------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine: pytest -m gpu)")
def test_cuda_device_lists_give_the_one_gpu_numbers():
    """Two threads on GPUs (the same one twice where only one exists), and a GPU with the CPU: the exact δ
    and TwoNN of one GPU."""
    two = ["cuda:0", "cuda:1"] if torch.cuda.device_count() > 1 else ["cuda:0", "cuda:0"]
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(400, 64, generator=g, dtype=torch.float64).cuda()
    one = gp.delta(pts, mode="exact")
    for devices in (two, ["cuda:0", "cpu"]):
        got = gp.delta(pts, mode="exact", devices=devices)
        assert got.delta == one.delta and got.diameter == one.diameter
    x = torch.randn(20000, 48, generator=g).cuda()
    x[7] = x[3]
    want = gp.intrinsic_dimension(x, n_boot=30, seed=1).to_dict()
    have = gp.intrinsic_dimension(x, n_boot=30, seed=1, devices=two).to_dict()
    for d in (want, have):
        d.pop("seconds"), d.pop("backend")
    assert have == want and want["n_duplicates_removed"] == 1
    d1, near1 = distances_at_ranks(as_float64_points(x, "cuda:0"), [1, 2, 9], tau=1e-9, chunk=4096)
    d2, near2 = distances_at_ranks_spread(as_float64_points(x, "cuda:0"), [1, 2, 9], DeviceSpread(
        [torch.device(d) for d in two]), tau=1e-9, chunk=4096)
    assert torch.equal(d1, d2) and torch.equal(near1, near2)


# --------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_numbers(tmp_path):
    x = _points(1500, 30, seed=2)
    np.save(tmp_path / "points.npy", x)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "spread_worker", str(tmp_path / "points.npy"), str(tmp_path / "out.json")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = [json.loads((tmp_path / f"out.json.{r}").read_text()) for r in range(2)]
    for key in ("delta", "delta_matrix", "id", "ranks", "near"):
        a, b = got[0][key], got[1][key]
        if key.startswith("delta"):
            a, b = {k: v for k, v in a.items() if k != "seconds"}, {k: v for k, v in b.items() if k != "seconds"}
        if key == "id":
            a = {e: {k: v for k, v in r.items() if k != "seconds"} for e, r in a.items()}
            b = {e: {k: v for k, v in r.items() if k != "seconds"} for e, r in b.items()}
        assert a == b, key  # every process returns the same result
    small = x[:120]
    one = gp.delta(small, mode="exact", base_point=3)
    assert got[0]["delta"]["delta"] == one.delta and got[0]["delta"]["backend"] == "numba-cpu (2 processes)"
    assert got[0]["delta_matrix"]["delta"] == gp.delta(euclidean_distances(small), distances=True, mode="exact").delta
    for est in ("twonn", "gride"):
        want = gp.intrinsic_dimension(x, estimator=est, n_boot=40, seed=5).to_dict()
        have = dict(got[0]["id"][est])
        assert have.pop("backend") == "cpu (2 processes)" and want.pop("backend") == "cpu"
        have.pop("seconds"), want.pop("seconds")
        assert have == json.loads(json.dumps(want))
    d, near = distances_at_ranks(as_float64_points(x), [1, 2, 5], tau=1e-9, chunk=128)
    assert got[0]["ranks"] == d.tolist() and got[0]["near"] == near.tolist()
