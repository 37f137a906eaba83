"""What the one-layer benchmarks (`bench_hyplora.py`, `bench_hydralora.py`) share: the shape flags and
their defaults (Llama-3-8B's FFN, 4096 → 14336 at 4 × 512 tokens on CUDA; 1024 → 2816 at 512 tokens on
the CPU), forward + backward steps against a fixed upstream gradient, interleaved timing (every method
once per round, so machine noise hits them alike; medians over rounds) and the common result fields."""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass(frozen=True)
class LayerShape:
    """One adapted linear layer's benchmark shape: ``tokens`` rows of ``d_in`` features into ``d_out``."""

    device: torch.device
    dtype: torch.dtype
    d_in: int
    d_out: int
    tokens: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def layer_arguments(description: str, *, r: int, extra: Callable[[argparse.ArgumentParser], None] | None = None
                    ) -> tuple[argparse.Namespace, LayerShape]:
    """Parse the shared flags (``--device --dtype --d-in --d-out --tokens --r --repeats --iters --out``, and
    whatever ``extra`` adds) and resolve the shape's defaults."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--d-in", type=int, default=None)
    ap.add_argument("--d-out", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None, help="batch × sequence length")
    ap.add_argument("--r", type=int, default=r)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--iters", type=int, default=10, help="forward+backward passes per timing")
    ap.add_argument("--out", default=None)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    shape = LayerShape(device=torch.device(args.device),
                       dtype=getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32),
                       d_in=args.d_in or (4096 if cuda else 1024), d_out=args.d_out or (14336 if cuda else 2816),
                       tokens=args.tokens or (4 * 512 if cuda else 512))
    return args, shape


def grad_step(fn: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor,
              iters: int) -> Callable[[], None]:
    """``iters`` forward + backward passes of ``fn``: the gradients of ``inputs`` for ``grad_out``."""
    def run() -> None:
        for _ in range(iters):
            torch.autograd.grad(fn(), list(inputs), grad_out)
    return run


def time_interleaved(methods: dict[str, Callable[[], None]], *, repeats: int, iters: int, cuda: bool
                     ) -> dict[str, list[float]]:
    """Seconds per pass of every method in each of ``repeats`` rounds, after one warm-up round."""
    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for fn in methods.values():
        fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) / iters)
    return times


def relative_rows(times: dict[str, list[float]], reference: str, key: str) -> list[dict[str, Any]]:
    """One row per method: its median seconds per pass and (``key``) its ratio to ``reference``'s."""
    med = {k: statistics.median(v) for k, v in times.items()}
    return [{"method": k, "median_s_per_step": med[k], key: med[k] / med[reference], "runs_s_per_step": v}
            for k, v in times.items()]


def layer_result(benchmark: str, layer: LayerShape, args: argparse.Namespace, rows: list[dict[str, Any]],
                 **fields: Any) -> dict[str, Any]:
    """The fields every one-layer benchmark records, then ``fields`` (``shape``: more shape entries)."""
    return {"benchmark": benchmark,
            "shape": {"d_in": layer.d_in, "d_out": layer.d_out, "tokens": layer.tokens, "r": args.r,
                      **fields.pop("shape", {})},
            "dtype": str(layer.dtype).removeprefix("torch."),
            "device": (torch.cuda.get_device_name(layer.device) if layer.cuda
                       else platform.processor() or platform.machine()),
            "threads": torch.get_num_threads(), "repeats": args.repeats, "iters_per_timing": args.iters,
            **fields, "rows": rows,
            "versions": {"torch": torch.__version__, "python": platform.python_version(),
                         "peft": __import__("peft").__version__}}
