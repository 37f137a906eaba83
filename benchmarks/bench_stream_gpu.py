"""`geoprobe report` on an 8B-shaped Llama-3 folder, whole against streamed one layer at a time: wall
time, peak GPU memory (``torch.cuda.max_memory_allocated``) and peak host memory (the process's
maximum resident set), each run in a fresh process.

The folder is laid out like meta-llama/Meta-Llama-3-8B: its config (hidden 4,096, MLP 14,336, 32
layers, 32 heads with 8 key/value heads, vocabulary 128,256, untied output head), random bfloat16
weights (normal, std 0.02; norms 1) in 4 safetensors shards with a ``model.safetensors.index.json``,
written shard by shard (one shard in memory at a time, never the model), and a real tokenizer: the
embedded default model's (SmolLM2, 49,152 ids, all below the vocabulary size), or a byte-level BPE
trained here when that package is missing.

Run (GPU):  python benchmarks/bench_stream_gpu.py [--folder /big/disk/llama3-8b-shape] [--keep]
Smoke check (CPU, seconds):  python benchmarks/bench_stream_gpu.py --small
Extra `geoprobe report` flags go after ``--`` (``--small`` adds quick probe settings by itself).
Each call appends a run (label ``cuda`` or ``small-<device>``) to benchmarks/results/stream_gpu.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.results_log import append_run, results_path  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
SMALL = dict(hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=50000, max_position_embeddings=2048, rope_theta=500000.0,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
QUICK = ["--n-prompts", "20", "--layer-positions", "300", "--layer-sets", "4", "--bootstrap", "50",
         "--id-bootstrap", "0", "--token-sets", "2"]
SHARDS = 4


# --------------------------------------------------------------------------- the folder
def tokenizer():
    """The embedded default model's tokenizer, else a byte-level BPE trained on CPython's docs."""
    try:
        from geoprobe.models import load_tokenizer

        return load_tokenizer(None)
    except Exception as exc:  # the default model's package is optional
        print(f"default tokenizer unavailable ({exc}); training a byte-level BPE", file=sys.stderr)
    sys.path.insert(0, str(HERE.parent / "tests"))
    import tiny_models

    return tiny_models.bpe_tokenizer(vocab_size=8000, n_topics=80)


def write_folder(folder: Path, shape: dict, seed: int = 0) -> dict:
    """Config, tokenizer and random bfloat16 weights in ``SHARDS`` shards, one shard in memory at a time.
    Returns what was written (parameters, bytes, seconds)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    config = LlamaConfig(**shape, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    total = sum(2 * _numel(s) for s in shapes.values())
    names, bins, acc = list(shapes), [[] for _ in range(SHARDS)], 0
    for name in names:  # fill the shards in order, about total/SHARDS bytes each
        bins[min(SHARDS - 1, acc * SHARDS // total)].append(name)
        acc += 2 * _numel(shapes[name])
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    weight_map = {}
    for k, shard in enumerate(bins, start=1):
        fname = f"model-{k:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {}
        for name in shard:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                t = torch.empty(shapes[name], device=gen_device, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
                tensors[name] = t.to(torch.bfloat16).cpu()
                del t
            weight_map[name] = fname
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return {"parameters": total // 2, "bytes": total, "write_s": round(time.perf_counter() - t0, 1),
            "tokenizer_ids": len(tok)}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# --------------------------------------------------------------------------- one measured run
def child(out: str, argv: list[str]) -> int:
    """Run ``geoprobe ARGV`` in this process and write its exit code, wall time, peak host RSS and peak
    GPU memory to ``out``."""
    import torch

    from geoprobe.cli import main

    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    rec = {"rc": rc, "wall_s": round(wall, 2),
           "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        rec["peak_gpu_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        rec["peak_gpu_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    Path(out).write_text(json.dumps(rec))
    return rc


def measure(label: str, report_args: list[str], tmp: Path) -> dict:
    """One `geoprobe report` in a fresh process: its record, the estimate it printed and its stage
    timings."""
    rec_path, prof_dir = tmp / f"{label}.json", tmp / f"profiles-{label}"
    args = ["report", *report_args, "--out", str(tmp / f"{label}.html"), "--save-profiles", str(prof_dir)]
    proc = subprocess.run([sys.executable, __file__, "--child", str(rec_path), "--", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not rec_path.exists():
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    rec = json.loads(rec_path.read_text())
    rec["printed"] = [line for line in proc.stderr.splitlines() if line.startswith("geoprobe: ")]
    profile = json.loads(next(prof_dir.glob("*.json")).read_text())
    rec["timings"] = profile["timings"]
    rec["hidden_states"] = profile["settings"].get("hidden_states")
    rec["model_dtype"] = profile["model"]["dtype"]
    for key in ("peak_host_rss_bytes", "peak_gpu_allocated_bytes"):
        if key in rec:
            rec[key.replace("_bytes", "_gib")] = round(rec[key] / 2**30, 2)
    return rec


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        rest = sys.argv[3:]
        sys.exit(child(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a small Llama-3-shaped folder: a smoke check on a CPU")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--folder", help="where to write the folder (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the folder (and reuse it when it exists)")
    ap.add_argument("--runs", default="whole,stream", help="comma-separated: whole, stream, float32 (whole in float32)")
    ap.add_argument("report_args", nargs="*", help="extra `geoprobe report` flags, after --")
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = SMALL if args.small else LLAMA3_8B
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmpdir:
        tmp = Path(tmpdir)
        folder = Path(args.folder) if args.folder else tmp / "llama3-8b-shape"
        built = {"reused": True}
        if not (args.keep and (folder / "model.safetensors.index.json").is_file()):
            built = write_folder(folder, shape)
        base = [str(folder), "--device", device, "--quiet", *(QUICK if args.small else []), *args.report_args]
        variants = {"whole": [], "stream": ["--stream"], "float32": ["--dtype", "float32"]}
        runs = {}
        for name in [r.strip() for r in args.runs.split(",") if r.strip()]:
            runs[name] = measure(name, base + variants[name], tmp)
            print(f"{name}: {json.dumps({k: v for k, v in runs[name].items() if k != 'timings'})}", flush=True)
        if args.folder and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    result = {"benchmark": "geoprobe report, Llama-3-8B-shaped folder (random bf16 weights, 4 shards): "
                           "whole vs streamed one layer at a time",
              "device": device, "shape": "small" if args.small else "Llama-3-8B",
              "settings": {"config": shape, "shards": SHARDS, "report_args": base[1:]},
              "folder": built, "runs": runs}
    label = f"small-{device}" if args.small else device
    append_run(results_path("stream_gpu"), result, label=label)
    print(json.dumps({k: (v if k != "runs" else list(v)) for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
