"""One process of the multi-process fine-tune test (tests/test_train_parallel.py), started by Accelerate's
launcher: ``python -m accelerate.commands.launch --multi_gpu --num_processes 2 … tests/parallel_worker.py
CASES.json OUT``.

For every case of CASES.json ({name, method, strategy, native, build, settings, stop}) it fine-tunes a
tiny Llama on the problems in OUT/train.jsonl three times with the adapters.train API on
the processes' group (gloo on the CPU; NCCL on GPUs when GEOPROBE_TEST_DEVICE=cuda, as the one-GPU check
of tests/test_train_parallel.py starts it through torchrun): straight through into OUT/<name>/straight; interrupted after step
``stop`` into OUT/<name>/resumed (the main process then copies that folder to OUT/<name>/handover, for
the test to resume in one process) and resumed there on the same processes. The main process writes
OUT/worker.json: for each case, how many forwards of the native HypLoRA / HydraLoRA node or of HypLoRA's
fused Triton node gave a result in this process."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from adapters.data import load_examples
from adapters.kernels import native
from adapters.train import TrainSettings, finetune
from adapters.train.parallel import Group, join
from tiny_models import bpe_tokenizer, tiny_llama


class Interrupt(Exception):
    pass


def _counting(module, name: str, counter: list[int]):
    """Wrap ``module.name`` so that every call that returns a result (not None) adds one to ``counter``."""
    inner = getattr(module, name)

    def wrapped(*args, **kwargs):
        out = inner(*args, **kwargs)
        if out is not None:
            counter[0] += 1
        return out

    setattr(module, name, wrapped)
    return inner


def run_case(case: dict, base: Group, out: Path, examples, counts: dict) -> None:
    import adapters.hydralora.kernels.linear as hydra_linear
    import adapters.hyplora.layer as hyp_layer

    group = Group(case["strategy"], base.device, base.accelerator)
    settings = TrainSettings(**case["settings"])
    previous = native.set_native_mode("all" if case["native"] else "off")
    counter = [0]
    # a result from hyplora_layer_native, the extension handed to hydra_linear, or a call of the fused
    # Triton node (CUDA only) is a fast forward
    saved = [(hyp_layer, name, _counting(hyp_layer, name, counter))
             for name in ("hyplora_layer_native", "hyplora_linear_fused")]
    saved.append((hydra_linear, "native_module", _counting(hydra_linear, "native_module", counter)))

    def model():  # on the process's device for DDP; FSDP shards it onto the device itself
        return tiny_llama() if case["strategy"] == "fsdp" else tiny_llama().to(group.device)

    try:
        kwargs = dict(settings=settings, progress=False, r=4, group=group, **case["build"])
        tok = bpe_tokenizer()
        finetune(model(), tok, examples, case["method"], out=out / "straight", **kwargs)

        def stop(step: int, loss: float) -> None:
            if step == case["stop"]:
                raise Interrupt

        try:
            finetune(model(), tok, examples, case["method"], out=out / "resumed", on_step=stop, **kwargs)
        except Interrupt:
            pass
        group.barrier()
        if group.is_main:
            shutil.copytree(out / "resumed", out / "handover")
        group.barrier()
        finetune(model(), tok, examples, case["method"], out=out / "resumed", resume=True, **kwargs)
    finally:
        for module, name, inner in saved:
            setattr(module, name, inner)
        native.set_native_mode(previous)
    counts[case["name"]] = counter[0]


def main(cases_path: str, out_root: str) -> None:
    torch.set_num_threads(1)
    cases = json.loads(Path(cases_path).read_text())
    root = Path(out_root)
    base = join("ddp", cpu=os.environ.get("GEOPROBE_TEST_DEVICE", "cpu") == "cpu")
    examples = load_examples(root / "train.jsonl")
    counts: dict[str, int] = {}
    for case in cases:
        run_case(case, base, root / case["name"], examples, counts)
    if base.is_main:
        (root / "worker.json").write_text(json.dumps({"native_calls": counts}))
    base.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
