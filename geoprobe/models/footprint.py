"""How much memory and time reading a model's hidden states will take, before anything is loaded.

:class:`Footprint` holds a checkpoint's sizes, from its safetensors headers and config (kilobytes
read): parameters in all, in the largest layer, in the input-embedding table; widths; bytes on disk.
:func:`estimate` turns it into an :class:`Estimate` for one way of reading the sample (the whole model
on the device, one layer at a time, or the input embeddings alone), with ``s`` the bytes of an element
in the compute dtype, ``T`` the sample's tokens, ``B × L`` a batch (sequences × tokens), ``H`` the
hidden size, ``I`` the MLP width, ``h`` the attention heads, ``N`` the layers and ``V × H`` the
input-embedding table:

* activations of one batch inside a layer ≈ B·L·(4H + 3I + h·L)·s (query/key/value/output, the MLP's
  gate/up/activation, the attention scores);
* whole model, device: all parameters · s + the batch's N + 1 hidden states B·L·H·(N + 1)·s + one
  batch's activations;
* streamed, device: the largest layer · s + the small non-layer parameters (norms; an encoder's
  position embeddings) · s + every batch's states twice (a layer's input and output) 2·T·H·s + one
  batch's activations;
* host: the interpreter and libraries (:data:`BASE_HOST_BYTES`, more with CUDA), the float32
  embedding table the probes read (V·H·4; for a streamed model the larger of that and the table in the
  compute dtype, which the capture holds after the probes have dropped theirs), two layers as read
  from disk when streamed (the next is read while one runs) (and in the compute dtype when the device is the CPU), the whole model when
  the device is the CPU, and the sampled states (N + 1)·positions·H·4 (at most the in-memory budget
  of :mod:`geoprobe.hidden`, beyond which they go to a memory-mapped file) with the float64 copies of
  one layer the geometry probes make;
* time ≈ bytes read / :data:`DISK_BYTES_PER_S` + 2 · (layer parameters · N) · T / (half the
  matrix-product rate measured on the device in the compute dtype); the geometry probes that follow
  (δ bootstraps, intrinsic dimension) are not included.

The figures are estimates for planning and for refusing budgets that cannot be met; the benchmark
(``benchmarks/bench_stream_gpu.py``) measures the real ones.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..errors import GeoprobeError
from ..records import Record
from .embeddings import embedding_shape, find_embedding_key
from .shards import TensorInfo

DISK_BYTES_PER_S = 1.0e9
"""Assumed rate of reading weights from disk (a solid-state drive; files already in the page cache
read faster)."""

BASE_HOST_BYTES = 3 * 2**28
"""Host memory of the interpreter, torch, transformers and geoprobe before a model is read (measured
about 0.4 GiB on a CPU after the imports, 0.7 GiB with the tokenizer, corpus and report)."""

CUDA_HOST_BYTES = 3 * 2**29
"""Host memory the CUDA runtime and its libraries add when a GPU is used."""

STATES_BUDGET = 4 * 2**30
"""Sampled states beyond this many bytes are memory-mapped (:data:`geoprobe.hidden.DEFAULT_MEMORY_BUDGET`)."""

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_UNITS = {"": 2**30, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory(text: Any, flag: str) -> Optional[int]:
    """Bytes of a memory size such as "24GiB", "24GB", "512MiB", "1.5G" (K/M/G/T and KiB/MiB/GiB/TiB
    are powers of 1024, KB/MB/GB/TB of 1000; a bare number is GiB); None for None. A size that is not
    positive or not understood raises :class:`GeoprobeError` naming ``flag``."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise GeoprobeError(f"{flag} {text!r} is not a memory size: write e.g. 24GiB, 24GB or 512MiB "
                            "(a bare number is GiB)")
    return int(float(m.group(1)) * _UNITS[unit])


def gib(n: float) -> str:
    """``n`` bytes in GiB with two decimals (in MiB below 1 GiB)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class Footprint(Record):
    """A checkpoint's sizes (see the module docstring); parameters count elements, ``file_bytes``
    the bytes of its tensors on disk, ``checkpoint_bytes`` the bytes per element of most of them."""

    n_parameters: int
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    vocab_size: int
    layer_parameters: int
    layer_file_bytes: int
    embedding_parameters: int
    device_rest_parameters: int
    file_bytes: int
    checkpoint_bytes: int

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, TensorInfo], config: dict) -> "Footprint":
        """The footprint of a checkpoint whose headers list ``tensors``, with raw config ``config``."""
        cfg = _text_config(config)
        n_layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
        vocab, hidden, tied = embedding_shape(config)
        names = sorted(tensors)
        emb_key = find_embedding_key(names, lambda n: tensors[n].shape, vocab, hidden, tied)
        layers: dict[int, list[TensorInfo]] = {}
        rest = 0
        for name, t in tensors.items():
            m = _LAYER_INDEX.search(name)
            if m and int(m.group(1)) < max(n_layers, 1):
                layers.setdefault(int(m.group(1)), []).append(t)
            elif name != emb_key and not name.endswith("lm_head.weight"):
                rest += t.numel
        biggest = max(layers.values(), key=lambda ts: sum(t.numel for t in ts), default=[])
        file_bytes = sum(t.nbytes for t in tensors.values())
        n_params = sum(t.numel for t in tensors.values())
        emb = tensors[emb_key]
        hidden = hidden or int(emb.shape[1])
        return cls(
            n_parameters=n_params, n_layers=n_layers or len(layers), hidden_size=int(hidden),
            intermediate_size=int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden),
            n_heads=int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1),
            vocab_size=int(emb.shape[0]), layer_parameters=sum(t.numel for t in biggest),
            layer_file_bytes=sum(t.nbytes for t in biggest), embedding_parameters=emb.numel,
            device_rest_parameters=rest, file_bytes=file_bytes,
            checkpoint_bytes=max(1, round(file_bytes / max(n_params, 1))))


def _text_config(config: dict) -> dict:
    for key in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(key), dict):
            return {**config, **config[key]}
    return config


@dataclass(frozen=True)
class Estimate(Record):
    """The memory and time of one way of reading the sample: ``mode`` "whole" (the model on the
    device), "streamed" (one layer at a time) or "embeddings" (the input-embedding table only);
    ``gpu_bytes`` (0 when the device is the CPU) and ``host_bytes`` at their peak; ``seconds`` for the
    reading and forward passes; ``layer_gpu_bytes`` what one streamed layer alone needs on the device
    (its weights and the sample's activations; the floor of any budget)."""

    mode: str
    device: str
    dtype: str
    gpu_bytes: int
    host_bytes: int
    seconds: float
    tokens: int
    read_bytes: int
    flops: float
    flops_per_second: float
    layer_bytes: int

    def describe(self) -> str:
        """One line: memory and time."""
        where = f"GPU {gib(self.gpu_bytes)}, host {gib(self.host_bytes)}" if self.gpu_bytes else \
            f"host {gib(self.host_bytes)}"
        what = {"whole": "the whole model", "streamed": "one layer at a time",
                "embeddings": "the input embeddings only"}[self.mode]
        rate = f", {self.flops / 1e12:.2g} TFLOP at ~{self.flops_per_second / 1e12:.2g} TFLOP/s" if self.flops else ""
        return (f"{what} in {self.dtype} on {self.device}: peak {where}; ~{self.seconds:.0f} s to read "
                f"{gib(self.read_bytes)}" + (f" and run {self.tokens:,} tokens" if self.tokens else "")
                + f" (disk ~{DISK_BYTES_PER_S / 1e9:.0f} GB/s{rate})")


def sample_tokens(positions: int, documents: int, max_length: int) -> int:
    """Tokens the hidden-state sample runs through the model, at most: documents are taken until they
    hold ``positions`` positions and number ``documents``, each cut at ``max_length`` tokens."""
    return max(positions, documents * max_length) + max_length


def matmul_rate(device: Any, dtype: Any, seconds: float = 0.1) -> float:
    """Floating-point operations per second of a square matrix product in ``dtype`` on ``device``
    (measured for about ``seconds``)."""
    import torch

    dev = torch.device(device)
    n = 4096 if dev.type == "cuda" else 1024
    a = torch.randn((n, n), device=dev).to(dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    a @ a
    reps = 1
    while True:
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ a
        sync()
        took = time.perf_counter() - t0
        if took >= seconds / 4 or reps >= 4096:
            return 2.0 * n ** 3 * reps / max(took, 1e-9)
        reps *= 4


def estimate(fp: Footprint, *, mode: str, device: Any, dtype: Any, tokens: int, positions: int,
             batch_size: int, max_length: int, flops_per_second: Optional[float] = None) -> Estimate:
    """The :class:`Estimate` of reading ``tokens`` tokens (``positions`` kept per layer, batches of
    ``batch_size`` × ``max_length``) of a checkpoint of footprint ``fp`` in ``mode`` on ``device`` in
    ``dtype`` (formulas in the module docstring). ``flops_per_second`` defaults to
    :func:`matmul_rate` of the device."""
    import torch

    dev = torch.device(device)
    s = torch.empty((), dtype=dtype).element_size()
    cuda = dev.type == "cuda"
    H, V, N = fp.hidden_size, fp.vocab_size, fp.n_layers
    host = BASE_HOST_BYTES + (CUDA_HOST_BYTES if cuda else 0)
    table32 = V * H * 4
    if mode == "embeddings":
        read = fp.embedding_parameters * fp.checkpoint_bytes
        return Estimate(mode=mode, device=str(dev), dtype="float32", gpu_bytes=0,
                        host_bytes=BASE_HOST_BYTES + read + table32, seconds=read / DISK_BYTES_PER_S,
                        tokens=0, read_bytes=read, flops=0.0, flops_per_second=0.0, layer_bytes=0)
    B, L = batch_size, max(min(max_length, tokens), 1)
    batch_act = B * L * (4 * H + 3 * fp.intermediate_size + fp.n_heads * L) * s
    states = min((N + 1) * positions * H * 4, STATES_BUDGET) + 3 * positions * H * 8
    flops = 2.0 * fp.layer_parameters * N * tokens
    rate = 0.5 * (flops_per_second if flops_per_second else matmul_rate(dev, dtype))
    layer = fp.layer_parameters * s + 2 * tokens * H * s + tokens * L + batch_act
    if mode == "whole":
        device_bytes = fp.n_parameters * s + B * L * H * (N + 1) * s + batch_act
        host += table32 + states + (0 if cuda else device_bytes)
        read = fp.file_bytes
    elif mode == "streamed":
        device_bytes = layer + fp.device_rest_parameters * s
        host += max(table32, V * H * s) + 2 * fp.layer_file_bytes + states + (0 if cuda else device_bytes)
        read = fp.file_bytes
    else:
        raise ValueError(f"unknown mode {mode!r}")
    seconds = read / DISK_BYTES_PER_S + flops / max(rate, 1.0)
    return Estimate(mode=mode, device=str(dev), dtype=str(dtype).removeprefix("torch."),
                    gpu_bytes=int(device_bytes) if cuda else 0, host_bytes=int(host),
                    seconds=float(seconds), tokens=int(tokens), read_bytes=int(read), flops=flops,
                    flops_per_second=rate, layer_bytes=int(layer))


def ceil_gib(n: float) -> str:
    """``n`` bytes rounded up to a tenth of a GiB, for messages that suggest a budget."""
    return f"{math.ceil(n / 2**30 * 10) / 10:.1f}GiB"
