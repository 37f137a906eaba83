"""bfloat16 rounding on the CPU, as a GPU's bfloat16 GEMMs round, and the criterion that tells that
rounding from a fault when two fine-tunes that should agree are compared after Adam steps.

Two runs of one fine-tune under bfloat16 autocast may still differ in how a matrix product sums its
terms: cuBLAS chooses its kernel (split-K or not, tile sizes) by shape and may choose by the operands'
alignment too, and FSDP's gathered parameters sit at other addresses than the module's own. Each product still sums in
float32 and rounds once to bfloat16, so the runs' activations and gradients differ by one bfloat16 step
(2⁻⁸ relative) where a float32 sum lies near a rounding boundary. Adam (Kingma & Ba 2015) divides each
gradient element by its running RMS, so its first steps are about ±lr whatever the gradient's size: an
element whose gradient is within rounding of zero can step the other way (LoRA-style B starts at zero,
so A's first non-zero gradient is small everywhere) and end up to 2·lr a step apart, while elements
with a clear gradient agree to rounding. `benchmarks/bench_adam_rounding_noise.py` measures both on the CPU.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from adapters.train.trainer import Trainer

TOTAL_SHARE = 0.01   # of all adapter elements, outside the element tolerance
TENSOR_SHARE = 0.10  # of one tensor's elements


def gaps(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, rtol: float, atol: float
         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per tensor of ``want``: |got − want| in float64 and where it exceeds ``atol + rtol·|want|``."""
    out = {}
    for key, w in want.items():
        diff = (got[key].double() - w.double()).abs()
        out[key] = diff, diff > atol + rtol * w.double().abs()
    return out


def outside_shares(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, rtol: float, atol: float
                   ) -> tuple[float, dict[str, float]]:
    """The share of all elements of ``want`` that ``got`` misses by more than ``atol + rtol·|want|``, and
    that share per tensor."""
    per = {key: off for key, (_, off) in gaps(got, want, rtol=rtol, atol=atol).items()}
    total = sum(off.numel() for off in per.values())
    return (sum(int(off.sum()) for off in per.values()) / total if total else 0.0,
            {key: float(off.double().mean()) for key, off in per.items()})


def adapter_mismatches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, rtol: float, atol: float,
                       reach: float, total_share: float = TOTAL_SHARE, tensor_share: float = TENSOR_SHARE,
                       reach_only: Optional[Callable[[str], bool]] = None) -> list[str]:
    """What keeps adapter ``got`` from equalling ``want`` up to bfloat16 rounding under Adam: empty when at
    most ``total_share`` of all elements (and ``tensor_share`` of any one tensor) lie outside
    ``atol + rtol·|want|`` and none is more than ``reach`` (2·lr·steps, Adam's reach) apart.

    ``reach_only(name)``: tensors whose gradient is within rounding of zero by construction in the first
    steps (HydraLoRA's router while its zero-initialised heads are still alike: ∂L/∂router is 0 at B = 0,
    and Adam turns its rounding into ±lr steps), bounded by Adam's reach alone and left out of the shares.

    Measured on the CPU (benchmarks/results/adam_rounding_noise.json, run cpu: HypLoRA r = 4, 6 steps at lr
    5e-3): five summation orders put 0.18–0.34 % of all elements and at most 2.7 % of one tensor outside
    rtol 2e-3 / atol 2e-4, while a lost gradient for half of each tensor's rows puts 68 % outside."""
    lines, outside, total = [], 0, 0
    for key, (diff, off) in gaps(got, want, rtol=rtol, atol=atol).items():
        if float(diff.max()) > reach:
            lines.append(f"{key}: max |Δ| {float(diff.max()):.3g} beyond Adam's reach {reach:g}")
        if reach_only is not None and reach_only(key):
            continue
        outside, total = outside + int(off.sum()), total + off.numel()
        if float(off.double().mean()) > tensor_share:
            lines.append(f"{key}: {int(off.sum())} of {off.numel()} elements outside rtol {rtol:g}/atol {atol:g} "
                         f"(at most {tensor_share:.0%})")
    if total and outside > total_share * total:
        lines.append(f"{outside} of {total} adapter elements outside rtol {rtol:g}/atol {atol:g} "
                     f"(at most {total_share:.0%})")
    return lines


def split_sum(a: torch.Tensor, b: torch.Tensor, parts: Optional[list[int]]) -> torch.Tensor:
    """a @ b in float32, the inner dimension cut at ``parts`` (percent) and the partial sums added last
    to first; one piece when ``parts`` is empty."""
    k = a.shape[-1]
    cuts = [0, *sorted({max(1, min(k - 1, k * p // 100)) for p in parts or []}), k]
    pieces = [a[..., i:j] @ b[i:j] for i, j in zip(cuts, cuts[1:])]
    out = pieces[-1]
    for piece in reversed(pieces[:-1]):
        out = out + piece
    return out


class Bf16Linear(torch.autograd.Function):
    """y = x Wᵀ (+ b) as a bfloat16 GEMM computes it: bfloat16 operands, float32 sums, one rounding to
    bfloat16, in forward and in both backward products (the inner dimension: features, outputs, tokens)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                parts: Optional[list[int]]) -> torch.Tensor:
        xb, wb = x.to(torch.bfloat16).float(), weight.to(torch.bfloat16).float()
        ctx.save_for_backward(xb, wb)
        ctx.parts, ctx.has_bias, ctx.x_dtype, ctx.w_dtype = parts, bias is not None, x.dtype, weight.dtype
        out = split_sum(xb, wb.T, parts)
        if bias is not None:
            out = out + bias.to(torch.bfloat16).float()
        return out.to(torch.bfloat16)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        xb, wb = ctx.saved_tensors
        gb = g.to(torch.bfloat16).float()
        gx = split_sum(gb, wb, ctx.parts).to(torch.bfloat16).to(ctx.x_dtype)
        g2, x2 = gb.reshape(-1, gb.shape[-1]), xb.reshape(-1, xb.shape[-1])
        gw = split_sum(g2.T, x2, ctx.parts).to(torch.bfloat16).to(ctx.w_dtype)
        gbias = g2.sum(0).to(torch.bfloat16).to(ctx.w_dtype) if ctx.has_bias else None
        return gx, gw, gbias, None


def bf16_linear(parts: Optional[list[int]]):
    """F.linear as :class:`Bf16Linear` under bfloat16 autocast (CPU or CUDA), the plain function elsewhere."""
    plain = F.linear

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        kind = x.device.type
        if not torch.is_autocast_enabled(kind):
            return plain(x, weight, bias)
        with torch.autocast(kind, enabled=False):
            return Bf16Linear.apply(x, weight, bias, parts)

    return linear


@contextlib.contextmanager
def bf16_products(parts: Optional[list[int]]) -> Iterator[None]:
    """Within the block, every linear product the trainer's step makes under bfloat16 autocast runs as
    :class:`Bf16Linear` summing with ``parts``; on the CPU the step is put under bfloat16 autocast (on CUDA
    the trainer already runs it so)."""
    original_setup, original_linear = Trainer._setup_step, F.linear

    def with_autocast(self: Any) -> None:
        original_setup(self)
        if self.device.type == "cpu":
            self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    Trainer._setup_step = with_autocast
    F.linear = bf16_linear(parts)
    try:
        yield
    finally:
        Trainer._setup_step, F.linear = original_setup, original_linear


def lose_half_the_rows(model: Any) -> None:
    """A fault to catch: the gradient of the second half of every trainable matrix's rows is lost (zero),
    as when a shard's gradient is never reduced."""
    for p in model.parameters():
        if p.requires_grad and p.dim() == 2:
            p.register_hook(lambda g: torch.cat([g[: g.shape[0] // 2], torch.zeros_like(g[g.shape[0] // 2:])]))
