"""intrinsic_dimension_layers (every layer in one call) against per-layer intrinsic_dimension calls,
the queued rank distances against distances_at_ranks, the probe pipeline's per-layer estimates, and
on CUDA (tests marked ``gpu``) the batched GPU path against per-layer GPU calls.

The oracle everywhere is the per-layer function, itself checked against brute force and
scikit-dimension in test_intrinsic_dim.py; "equal" means every field but ``seconds`` is identical."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re

import numpy as np
import pytest
import torch

from geoprobe.errors import InputDataError
from geoprobe.probes.intrinsic_dim import (_layers_batched, _Options, at_shared_scale,
                                           intrinsic_dimension, intrinsic_dimension_layers)
from geoprobe.backends.knn_certified import distances_at_ranks, distances_at_ranks_queued

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA (run on the GPU machine: pytest -m gpu)")


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _manifold(rng: np.random.Generator, n: int, dim: int, d: int = 5) -> np.ndarray:
    z = rng.standard_normal((n, d))
    return np.tanh(z @ rng.standard_normal((d, dim)) / math.sqrt(d)) \
        + 0.01 * rng.standard_normal((n, dim)) + rng.uniform(-3, 3)


def _layers(rng: np.random.Generator, dim: int = 40) -> list[np.ndarray]:
    """Layers of awkward sizes: clean float32 and float64 ones, one with exact duplicate rows, one
    with near-duplicates (float32 copies), one with too few distinct points."""
    out = []
    for i in range(7):
        x = _manifold(rng, int(rng.integers(250, 520)), dim)
        if i == 2:
            x = np.concatenate([x, x[:37]])[rng.permutation(len(x) + 37)]
        if i == 4:
            x = np.concatenate([x, x[:25].astype(np.float32).astype(np.float64)])
        if i == 5:
            x = np.repeat(x[:2], 30, axis=0)
        out.append(x.astype(np.float32) if i % 3 == 0 else x)
    return out


def _bare(r):
    return None if r is None else dataclasses.replace(r, seconds=0.0)


def _per_layer(layers, shared=True, **kw):
    """Per-layer calls (an error's message in place of a failed layer's result); GRIDE results then
    at the scale shared by all layers, as intrinsic_dimension_layers reports them (``shared``)."""
    out = []
    for x in layers:
        try:
            out.append(_bare(intrinsic_dimension(x, **kw)))
        except InputDataError as exc:
            out.append(str(exc))
    if shared and kw.get("estimator") == "gride":
        ok = [r for r in out if not isinstance(r, str)]
        moved = iter(at_shared_scale(ok))
        out = [r if isinstance(r, str) else next(moved) for r in out]
    return out


class _Counter:
    def __init__(self):
        self.n = 0

    def update(self, k: int = 1) -> None:
        self.n += k


# --------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("estimator", ["twonn", "gride"])
def test_layers_equal_per_layer_calls(estimator, caplog):
    seed = _seed()
    layers = _layers(np.random.default_rng(seed))
    ref = _per_layer(layers, estimator=estimator)
    assert isinstance(ref[5], str) and all(not isinstance(r, str) for i, r in enumerate(ref) if i != 5)
    counter = _Counter()
    with caplog.at_level(logging.WARNING, logger="geoprobe.probes.intrinsic_dim"):
        got = intrinsic_dimension_layers(layers, estimator=estimator, on_error="skip",
                                         progress=counter)
    assert counter.n == len(layers)
    assert [_bare(r) for r in got] == [None if isinstance(r, str) else r for r in ref], seed
    assert f"layer 5: {estimator} skipped: {ref[5]}" in caplog.text
    assert got[2].n_duplicates_removed == 37 and got[4].n_duplicates_removed == 25
    with pytest.raises(InputDataError, match="^layer 5: only 2 distinct points"):
        intrinsic_dimension_layers(layers, estimator=estimator)
    # torch tensors on the CPU, and other options, pass through unchanged
    kw = dict(estimator=estimator, dedup_tol=0, selection_dtype="3xtf32", discard_fraction=0.2)
    if estimator == "gride":
        kw["scales"] = [1, 3]
    tensors = [torch.from_numpy(np.asarray(x)) for i, x in enumerate(layers) if i != 5]
    assert [_bare(r) for r in intrinsic_dimension_layers(tensors, **kw)] == _per_layer(tensors, **kw)


def test_layers_stacked_input_and_bad_input():
    seed = _seed()
    rng = np.random.default_rng(seed)
    stack = np.stack([_manifold(rng, 301, 24) for _ in range(4)])
    ref = _per_layer(list(stack))
    assert [_bare(r) for r in intrinsic_dimension_layers(stack)] == ref, seed
    assert [_bare(r) for r in intrinsic_dimension_layers(torch.from_numpy(stack))] == ref, seed
    assert [_bare(r) for r in intrinsic_dimension_layers(iter(list(stack)))] == ref, seed
    for bad, match in [([], "no layers"), (stack[0], "shape"), ("abc", "sequence"), (3, "sequence")]:
        with pytest.raises(InputDataError, match=match):
            intrinsic_dimension_layers(bad)
    with pytest.raises(InputDataError, match="on_error"):
        intrinsic_dimension_layers(stack, on_error="ignore")
    with pytest.raises(InputDataError, match="estimator"):
        intrinsic_dimension_layers(stack, estimator="mle")
    with pytest.raises(InputDataError, match="dedup_tol"):
        intrinsic_dimension_layers(stack, dedup_tol=-1.0)
    with pytest.raises(InputDataError, match="^layer 1: .*NaN"):
        bad_layer = stack.copy()
        bad_layer[1, 7, 3] = np.nan
        intrinsic_dimension_layers(bad_layer)


@pytest.mark.parametrize("estimator", ["twonn", "gride"])
def test_batched_path_on_cpu_equals_per_layer(estimator, caplog):
    """The GPU algorithm (queued selections, certificates, one copy) run on the CPU: same answers,
    and only the layers that need it (near-duplicates, too few points) are recomputed on their own."""
    seed = _seed()
    layers = _layers(np.random.default_rng(seed))
    ref = _per_layer(layers, shared=False, estimator=estimator)  # the shared scale comes after
    opts = _Options(estimator, None, None, 1e-6, 0.1, None)
    with caplog.at_level(logging.DEBUG, logger="geoprobe.probes.intrinsic_dim"):
        got = _layers_batched(layers, torch.device("cpu"), opts, "skip", None)
    assert [_bare(r) for r in got] == [None if isinstance(r, str) else r for r in ref], seed
    redone = {int(i) for i in re.findall(r"layer (\d+): recomputed on its own", caplog.text)}
    assert redone == {4, 5}, seed
    # GRIDE scales that one layer cannot hold fail for that layer alone, with the same message
    if estimator == "gride":
        small = [layers[0], layers[1][:30]]
        ref = _per_layer(small, shared=False, estimator="gride", scales=[1, 16])
        opts = _Options("gride", None, [1, 16], 1e-6, 0.1, None)
        got = _layers_batched(small, torch.device("cpu"), opts, "skip", None)
        assert _bare(got[0]) == ref[0] and got[1] is None and "n1=16" in ref[1]
        with pytest.raises(InputDataError, match="^layer 1: GRIDE scale n1=16"):
            _layers_batched(small, torch.device("cpu"), opts, "raise", None)


def test_queued_ranks_equal_distances_at_ranks():
    seed = _seed()
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(_manifold(rng, int(rng.integers(400, 900)), 30))
    ranks = [1, 2, 4, 8, 16, 32]
    for sel in (None, "3xtf32", torch.float64):
        got, ok = distances_at_ranks_queued(x, ranks, min_distance=1e-9, selection_dtype=sel,
                                            chunk=int(rng.integers(50, 300)))
        ref, _ = distances_at_ranks(x, ranks)
        assert bool(ok) and torch.equal(got, ref), seed
    # every other point a candidate (small N)
    got, ok = distances_at_ranks_queued(x[:9], [1, 2, 4])
    assert bool(ok) and torch.equal(got, distances_at_ranks(x[:9], [1, 2, 4])[0])
    # near-duplicates: refused when closer than min_distance, accepted (and exact) otherwise
    xd = torch.cat([x, x[:5] + 1e-12])
    assert not bool(distances_at_ranks_queued(xd, [1, 2], min_distance=1e-9)[1])
    # exact ties (a lattice): the certificate cannot hold, the flag says so
    g = np.stack(np.meshgrid(*[np.arange(6.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    assert not bool(distances_at_ranks_queued(torch.from_numpy(g), [1, 2])[1])


def test_pipeline_layer_estimates_equal_per_layer_calls():
    """The probe's per-layer TwoNN/GRIDE (through intrinsic_dimension_layers) are those of
    intrinsic_dimension on each layer's rows without its sinks, GRIDE at the scale shared by the
    layers; a layer whose TwoNN fails has neither."""
    from geoprobe.hidden import HiddenStates, sink_mask
    from geoprobe.pipeline import ProbeSettings, _layer_geometry, _Progress

    seed = _seed()
    rng = np.random.default_rng(seed)
    n, dim = 420, 32
    layers = [_manifold(rng, n, dim).astype(np.float32) for _ in range(4)]
    layers[1][:3] *= 50.0  # sinks: excluded before the estimates
    layers[3] = np.repeat(layers[3][:2], n // 2, axis=0)  # two distinct rows: no estimate
    hs = HiddenStates(layers=layers, doc_index=np.arange(n) // 10, position=np.arange(n) % 10,
                      token_id=np.zeros(n, dtype=np.int64))
    s = ProbeSettings(id_boot=0)  # the estimates themselves, no bootstrap
    got, sinks = _layer_geometry(hs, s, _Progress(False), np.random.SeedSequence(seed))
    kept = [x[~sink_mask(np.linalg.norm(x, axis=1), s.sink_factor)]
            for x in (layer.astype(np.float64) for layer in layers[:3])]
    gride = at_shared_scale([intrinsic_dimension(x, estimator="gride") for x in kept])
    assert len({g.scale_n1 for g in gride} | {lg.gride.scale_n1 for lg in got[:3]}) == 1
    for li, lg in enumerate(got):
        x = layers[li].astype(np.float64)
        keep = x[~sink_mask(np.linalg.norm(x, axis=1), s.sink_factor)]
        assert lg.n_positions == keep.shape[0]
        if li == 3:
            assert lg.twonn is None and lg.gride is None
            continue
        assert _bare(lg.twonn) == _bare(intrinsic_dimension(keep, estimator="twonn")), seed
        assert _bare(lg.gride) == _bare(gride[li]), seed
    assert got[1].n_sinks_excluded == 3 and sinks.excluded_by_layer[1] == 3


# --------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("estimator", ["twonn", "gride"])
def test_gpu_layers_equal_per_layer_gpu_calls(estimator, caplog):
    seed = _seed()
    rng = np.random.default_rng(seed)
    layers = _layers(rng, dim=int(rng.integers(64, 600)))
    cuda = [torch.from_numpy(np.asarray(x)).cuda() for x in layers]
    ref = _per_layer(cuda, estimator=estimator)
    with caplog.at_level(logging.DEBUG, logger="geoprobe.probes.intrinsic_dim"):
        got = intrinsic_dimension_layers(cuda, estimator=estimator, on_error="skip")
    assert all(r is None or r.backend == "cuda" for r in got)
    assert [_bare(r) for r in got] == [None if isinstance(r, str) else r for r in ref], seed
    redone = {int(i) for i in re.findall(r"layer (\d+): recomputed on its own", caplog.text)}
    assert redone == {4, 5}, seed
    # numpy layers sent to the GPU, and the CPU answer to rounding
    got_np = intrinsic_dimension_layers(layers, estimator=estimator, device="cuda", on_error="skip")
    assert [_bare(r) for r in got_np] == [_bare(r) for r in got], seed
    cpu = intrinsic_dimension_layers(layers, estimator=estimator, on_error="skip")
    for g, c in zip(got, cpu):
        assert (g is None) == (c is None)
        if g is not None:
            assert g.n_points == c.n_points and g.dimension == pytest.approx(c.dimension, rel=1e-11)


@pytest.mark.gpu
@needs_cuda
def test_gpu_layers_stacked_probe_sizes():
    """30 × 1200 × 576 (SmolLM2-like probe sizes) as one (L, N, D) CUDA tensor; the float32
    selection gives the same answers as the default 3xTF32 one."""
    seed = _seed()
    g = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(30, 1200, 8, device="cuda", generator=g)
    a = torch.randn(30, 8, 576, device="cuda", generator=g)
    x = torch.tanh(z @ a / 8 ** 0.5) + 0.01 * torch.randn(30, 1200, 576, device="cuda", generator=g)
    got = intrinsic_dimension_layers(x)
    got32 = intrinsic_dimension_layers(x, selection_dtype=torch.float32)
    ref = _per_layer([x[i] for i in range(30)])
    assert [_bare(r) for r in got] == ref == [_bare(r) for r in got32], seed


def test_out_of_gpu_memory_is_reported_with_the_size(monkeypatch):
    """An out-of-memory error inside the neighbour search becomes one InputDataError naming the
    point count, the width and the memory needed (no traceback, nothing half done)."""
    import geoprobe.probes.intrinsic_dim as idm
    from geoprobe.errors import InputDataError

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(idm, "_prepare", boom)
    x = np.random.default_rng(0).standard_normal((1234, 56))
    with pytest.raises(InputDataError) as info:
        idm.intrinsic_dimension(x)
    msg = str(info.value)
    assert "1,234 points × 56 coordinates" in msg and "subsample" in msg
    need = float(msg.split("about ")[1].split(" GiB")[0])
    assert abs(need - 1234 * 56 * idm.GPU_BYTES_PER_ENTRY / 2 ** 30) < 0.05


def test_gride_scale_beyond_a_layer_is_that_layers_error():
    """A scale n1 ≥ N of one layer: that layer's clear error (naming n1 and N) on both paths, the
    other layers estimated."""
    rng = np.random.default_rng(11)
    layers = [_manifold(rng, 300, 20), _manifold(rng, 40, 20)]
    opts = _Options("gride", None, [32], 1e-6, 0.1, None)
    for got in (intrinsic_dimension_layers(layers, estimator="gride", scales=[32], on_error="skip"),
                _layers_batched(layers, torch.device("cpu"), opts, "skip", None)):
        assert got[1] is None and _bare(got[0]) == _bare(intrinsic_dimension(layers[0], estimator="gride",
                                                                             scales=[32]))
    with pytest.raises(InputDataError, match=r"layer 1: GRIDE scale n1=32 .*40 points"):
        intrinsic_dimension_layers(layers, estimator="gride", scales=[32])
    with pytest.raises(InputDataError, match=r"layer 1: GRIDE scale n1=32 .*40 points"):
        _layers_batched(layers, torch.device("cpu"), opts, "raise", None)
