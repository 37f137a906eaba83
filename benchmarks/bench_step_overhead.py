"""Host cost of one fine-tuning step outside and inside the model, with the model's own arithmetic made
negligible: a random Llama with SmolLM2-135M's depth (30 layers) but hidden size 8, trained by
``adapters.train.Trainer`` on GSM8K tokenised with SmolLM2's tokenizer (ids folded into the tiny
vocabulary, id mod V), packed into rows of 256, as ``geoprobe finetune --batch-size 16 --max-length 256``.

Three parts, each timed on this machine's CPU (one torch thread), medians over interleaved rounds:

1. the data path of one micro-batch of 16 × 256 — the earlier path (``adapters.data.collate`` of the
   Python lists, ``answer_targets``, one move per tensor: on CUDA a pinned copy and a transfer each) beside
   the current one (:class:`adapters.train.batches.SequenceBank` rows, ``answer_targets``, one move of all
   tensors); the batches are checked equal first;
2. the phases of ``Trainer.step`` (data, zero_grad, forward with the answer loss, backward, gradient
   clipping, AdamW, the schedule) per adapter method, ms per step, at ``--model-batch`` rows (2 by default:
   at 16 rows the CPU's attention over 16 × 256 tokens is real work, not host overhead); with the number
   of ATen operations the forward dispatches, those of them that would launch a kernel on a GPU (not
   views, not allocations), and the autograd nodes the backward runs — independent of this machine — and those forward operations by the
   innermost module that dispatched them (adapter layers, norms, attention, MLP, the model's own code);
3. one adapted projection (q_proj of layer 0) called alone, forward + backward on 16 tokens: µs per call
   for each method beside the frozen ``nn.Linear`` it wraps, and the ATen operations of its forward.

Run: python benchmarks/bench_step_overhead.py   → appends a run to benchmarks/results/step_overhead.json
     (--small: fewer rounds and steps, a check that the script runs)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from adapters.data import collate, load_examples  # noqa: E402
from adapters.train import TrainSettings  # noqa: E402
from adapters.train import loss as loss_fns  # noqa: E402
from adapters.train.batches import SequenceBank, move_together  # noqa: E402
from adapters.train.trainer import Trainer  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gsm8k"
VOCAB, HIDDEN, LAYERS = 512, 8, 30
BATCH, MAX_LENGTH = 16, 256


NO_KERNEL = {"_unsafe_view", "empty", "empty_like", "empty_strided", "lift_fresh"}
"""Operations that are not views (``OpOverload.is_view``) yet launch no kernel: reshapes of contiguous
tensors and allocations."""


def launches(func: Any) -> bool:
    """Whether ATen operation ``func`` would be a kernel on a GPU (not a view, not an allocation)."""
    return not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL


class CountOps(TorchDispatchMode):
    """Counts the ATen operations dispatched inside the ``with`` block: all of them (``n``) and those
    that launch a kernel (``kernels``, see :func:`launches`)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        self.kernels += launches(func)
        return func(*args, **(kwargs or {}))


class OpsByModule(TorchDispatchMode):
    """Counts the kernel-launching ATen operations (:func:`launches`) dispatched inside the ``with`` block by the innermost module running
    them (package and class name; ``(outside)`` for those outside every module of ``model``)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.stack: list[str] = []
        self.handles = []
        for m in model.modules():
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, module: Any, args: Any) -> None:
        cls = type(module)  # the package too: PEFT's LoRA layer and torch's are both called Linear
        self.stack.append(f"{cls.__module__.split('.')[0]}.{cls.__name__}")

    def _leave(self, module: Any, args: Any, out: Any) -> None:
        self.stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches(func):
            key = self.stack[-1] if self.stack else "(outside)"
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def autograd_nodes(root: Any) -> int:
    """The nodes of the autograd graph below ``root`` (each runs at least one backward kernel)."""
    seen, todo = set(), [root.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(fn for fn, _ in node.next_functions)
    return len(seen)


def tiny_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1,
                      eos_token_id=2, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def make_trainer(tokenizer: Any, examples: list, method: str, batch: int, steps: int) -> Trainer:
    settings = TrainSettings(lr=1e-3, max_steps=steps, batch_size=batch, max_length=MAX_LENGTH, save_every=10 ** 6,
                             log_every=10, warmup_ratio=0.0)
    extra = {"n_heads": 4} if method == "hydralora" else {}
    out = Path(tempfile.mkdtemp(prefix="step-overhead-")) / "run"
    trainer = Trainer(tiny_model(), tokenizer, examples, method, out=out, settings=settings,
                      build_kwargs={"r": 4, **extra})
    for seq in trainer.seqs:  # the tiny vocabulary: fold the ids
        seq["input_ids"] = [t % VOCAB for t in seq["input_ids"]]
        seq["labels"] = [t if t < 0 else t % VOCAB for t in seq["labels"]]
    trainer.bank = SequenceBank(trainer.seqs, trainer.pad)
    return trainer


def median_ms(fn: Callable[[], Any], rounds: int, repeat: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        times.append((time.perf_counter() - t) / repeat * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------- 1. data path
def data_path(trainer: Trainer, rounds: int) -> dict:
    dev = trainer.device
    mover = (lambda t: t.pin_memory().to(dev, non_blocking=True)) if dev.type == "cuda" else (lambda t: t.to(dev))
    picks = [trainer.order.indices(m) for m in range(trainer.order.per_epoch)]

    def earlier(rows: list[int]) -> tuple:
        b = collate([trainer.seqs[i] for i in rows], trainer.pad)
        index, target = loss_fns.answer_targets(b["labels"])
        return {k: mover(v) for k, v in b.items() if k != "labels"}, mover(index), mover(target)

    def current(rows: list[int]) -> tuple:
        b = trainer.bank.collate(rows)
        index, target = loss_fns.answer_targets(b.pop("labels"))
        *moved, index, target = move_together([*b.values(), index, target], dev)
        return dict(zip(b, moved)), index, target

    for rows in picks:  # the same batches, element for element
        a, b = earlier(rows), current(rows)
        assert list(a[0]) == list(b[0]) and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    it = {"earlier": 0, "current": 0}

    def one(name: str, fn: Callable) -> Callable[[], Any]:
        def call() -> Any:
            it[name] += 1
            return fn(picks[it[name] % len(picks)])
        return call

    old, new = [], []
    for _ in range(rounds):  # interleaved
        old.append(median_ms(one("earlier", earlier), 1, 20))
        new.append(median_ms(one("current", current), 1, 20))
    real = statistics.fmean(sum(len(trainer.seqs[i]["input_ids"]) for i in rows) for rows in picks)
    return {"micro_batch": f"{BATCH} rows × up to {MAX_LENGTH} (packed), {real:.0f} real tokens on average",
            "device": str(dev), "earlier_ms": statistics.median(old), "current_ms": statistics.median(new),
            "speed_up": statistics.median(old) / statistics.median(new)}


# --------------------------------------------------------------------------- 2. step phases
def step_phases(trainer: Trainer, steps: int) -> dict:
    trainer.setup()
    trainer.start(progress=False)
    head = trainer.peft_model.get_output_embeddings()
    for _ in range(3):
        trainer.step()
    phases: dict[str, list[float]] = {k: [] for k in ("data", "zero_grad", "forward", "backward", "clip",
                                                        "optimizer", "schedule")}

    def timed(name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        phases[name].append((time.perf_counter() - t) * 1e3)
        return out

    for _ in range(steps):  # Trainer.step, its phases timed one by one (one micro-batch a step)
        picks = [trainer.order.indices(trainer.micro)]
        work, n_tok = timed("data", trainer._micro_batches, picks)
        timed("zero_grad", trainer.optimizer.zero_grad, set_to_none=True)
        inputs, index, target, _ = work[0]
        part = timed("forward", loss_fns.answer_loss_sum, trainer.wrapped, inputs, index, target, head=head)
        timed("backward", (part / n_tok).backward)
        timed("clip", torch.nn.utils.clip_grad_norm_, trainer.params, trainer.settings.max_grad_norm)
        timed("optimizer", trainer.optimizer.step)
        timed("schedule", trainer.scheduler.step)
        trainer.micro += 1
    counter = CountOps()
    work, n_tok = trainer._micro_batches([trainer.order.indices(trainer.micro)])
    inputs, index, target, _ = work[0]
    with counter:
        part = loss_fns.answer_loss_sum(trainer.wrapped, inputs, index, target, head=head)
    by_module = OpsByModule(trainer.peft_model)
    try:
        with by_module:
            loss_fns.answer_loss_sum(trainer.wrapped, inputs, index, target, head=head)
    finally:
        by_module.remove()
    ms = {k: statistics.median(v) for k, v in phases.items()}
    return {"ms": ms, "total_ms": sum(ms.values()), "forward_aten_ops": counter.n,
            "forward_kernel_ops": counter.kernels, "forward_kernel_ops_by_innermost_module": dict(sorted(by_module.counts.items(), key=lambda kv: -kv[1])),
            "backward_autograd_nodes": autograd_nodes(part), "trainable_tensors": len(trainer.params)}


# --------------------------------------------------------------------------- 3. one layer
def layer_call(trainer: Trainer, rounds: int) -> dict:
    layer = trainer.peft_model.get_base_model().model.layers[0].self_attn.q_proj
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    x = torch.randn(16, HIDDEN, requires_grad=True)

    def fwd_bwd(module: Any) -> Callable[[], Any]:
        return lambda: module(x).sum().backward()

    counter = CountOps()
    with counter:
        layer(x)
    pairs = [(median_ms(fwd_bwd(layer), 1, 200), median_ms(fwd_bwd(base), 1, 200)) for _ in range(rounds)]
    return {"adapted_us": statistics.median(p[0] for p in pairs) * 1e3,
            "frozen_linear_us": statistics.median(p[1] for p in pairs) * 1e3,
            "forward_aten_ops": counter.n, "forward_kernel_ops": counter.kernels, "layer": type(layer).__name__}


def main() -> None:
    from geoprobe.models import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="GSM8K folder (train.jsonl)")
    ap.add_argument("--methods", default="lora,hyplora,hydralora")
    ap.add_argument("--model-batch", type=int, default=2, help="rows per step in part 2")
    ap.add_argument("--small", action="store_true", help="few rounds and steps: a check that it runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rounds, steps = (3, 3) if args.small else (15, 20)
    tokenizer = load_tokenizer()
    examples = load_examples(args.data / "train.jsonl", limit=200 if args.small else 800)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    data = data_path(make_trainer(tokenizer, examples, "lora", BATCH, 10), rounds)
    print(f"data path, one micro-batch ({data['micro_batch']}): earlier {data['earlier_ms']:.3f} ms, "
          f"current {data['current_ms']:.3f} ms ({data['speed_up']:.1f}×)")
    rows = []
    for method in methods:
        trainer = make_trainer(tokenizer, examples, method, args.model_batch, steps + 10)
        row = {"method": method, **step_phases(trainer, steps), "layer_call": layer_call(trainer, rounds)}
        rows.append(row)
        phases = ", ".join(f"{k} {v:.2f}" for k, v in row["ms"].items())
        lc = row["layer_call"]
        print(f"{method:<10} step {row['total_ms']:7.1f} ms ({phases}); forward {row['forward_aten_ops']} ATen ops, "
              f"{row['forward_kernel_ops']} of them kernels, backward {row['backward_autograd_nodes']} nodes; q_proj fwd+bwd {lc['adapted_us']:.0f} µs "
              f"(frozen Linear {lc['frozen_linear_us']:.0f} µs, {lc['forward_aten_ops']} ops, {lc['forward_kernel_ops']} kernels forward)")
        print(f"{'':<10} forward kernels by innermost module: "
              + ", ".join(f"{k} {v}" for k, v in row["forward_kernel_ops_by_innermost_module"].items()))
    append_run(results_path("step_overhead"), {
        "benchmark": "host cost of a fine-tuning step with negligible model arithmetic (30-layer Llama, hidden 8)",
        "settings": {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "data_batch": BATCH,
                     "max_length": MAX_LENGTH, "model_batch": args.model_batch, "r": 4, "rounds": rounds,
                     "steps": steps, "torch_threads": torch.get_num_threads(), "examples": len(examples)},
        "data_path": data, "methods": rows,
    }, label="small" if args.small else "cpu")


if __name__ == "__main__":
    main()
