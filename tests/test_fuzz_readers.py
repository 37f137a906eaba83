"""Bounded fuzzing of every reader of files geoprobe did not write: profile JSON, adapter-plan JSON,
adapter folders (PEFT's ``adapter_config.json``, the ``geoprobe_adapter.json`` sidecar and the
safetensors header), training and evaluation data (JSON, JSON lines, GLUE TSV, CSV, text), corpora
(text, Markdown, JSON, JSON lines, folders, with and without ``--field``) and GGUF files (header,
metadata, tensor table, the tokenizer built from the metadata, and the hash index and cache marker
geoprobe keeps beside its cache).

Every reader must answer a damaged or hostile file with a :class:`GeoprobeError` (one message, exit 2
on the command line) or read it; any other exception, or a call that runs longer than
``CALL_LIMIT`` seconds, is a failure. Inputs are valid seed files changed by mutators that know the
formats (a JSON value replaced, deleted, retyped, duplicated or nested deeply; a GGUF count or length
field set to an extreme; a safetensors header edited) and by byte-level ones (bit flips, cuts,
splices, inserted tokens such as an integer of 5,000 digits). The run is deterministic for a seed
and bounded in time: ``GEOPROBE_FUZZ_SECONDS`` (default 60) is shared between the targets,
``GEOPROBE_FUZZ_SEED`` (default 0) picks another sequence. A failing input is kept under
``tests/_artifacts/fuzz/`` and named in the failure message.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import shutil
import signal
import struct
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from geoprobe.errors import GeoprobeError

TOTAL_SECONDS = float(os.environ.get("GEOPROBE_FUZZ_SECONDS", "60"))
SEED = int(os.environ.get("GEOPROBE_FUZZ_SEED", "0"))
SHARES = {"profile": 0.15, "plan": 0.08, "adapter": 0.2, "data": 0.17, "corpus": 0.15, "gguf": 0.25}
CALL_LIMIT = 10.0
ARTIFACTS = Path(__file__).parent / "_artifacts" / "fuzz"
REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


# --------------------------------------------------------------------------- mutators
EXTREME_INTS = (0, 1, -1, 2, 3, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1,
                2**63, 2**64 - 1)
TEXTS = ("", " ", "x", "\x00", "\ud800", "<script>alert(1)</script>", "../../../etc/passwd", "/dev/zero",
         "a.b", "0", "-1", "1e309", "NaN", "²", "--1", "q_proj", "lora", "auto", "hyplora",
         "é" * 200, "\u202e\u0000\u0085", "#### 72", "Answer format: a/b", "Answer Choices: (A) 1 (B) 2")
BYTE_TOKENS = (b"9" * 5000, b"[" * 20000, b"{\"a\":" * 5000, b"\x00", b"\xff\xfe", b"\xef\xbb\xbf", b"NaN",
               b"-Infinity", b"1e99999", b"\"\\ud800\"", b"\"\\u0000\"", b"\t", b"\r\n", b"\n\n", b",",
               b"\"", b"\\", b"}", b"]", b"null", b"#### 5", b"\t1\t", b"\x85", b"A" * 200_000)


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value with extreme numbers, odd strings and nesting."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(EXTREME_INTS) * rng.choice((1, -1))
    if kind == 3:
        return rng.choice((0.0, -0.0, 0.5, 1e-320, 1e308, -1e308, float("nan"), float("inf"), 3.75))
    if kind in (4, 5):
        return rng.choice(TEXTS)
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return {rng.choice(TEXTS): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [[[]]] if rng.random() < 0.5 else {"": {}}


def _nodes(value: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:50]):
            yield from _nodes(v, path + (i,))


def _get(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


def mutate_json(value: Any, rng: random.Random) -> Any:
    """One structural change at a random place of a JSON value (a deep copy is returned)."""
    value = copy.deepcopy(value)
    nodes = list(_nodes(value))
    path = rng.choice(nodes)
    node = _get(value, path)
    op = rng.randrange(9)
    if op == 0 and isinstance(node, dict) and node:
        del node[rng.choice(list(node))]
        return value
    if op == 1 and isinstance(node, dict):
        node[rng.choice(TEXTS)] = random_json(rng)
        return value
    if op == 2 and isinstance(node, list) and node:
        node.extend(copy.deepcopy(node) * rng.choice((1, 3, 50)))
        return value
    if op == 3 and isinstance(node, list) and node:
        del node[rng.randrange(len(node))]
        return value
    new = {4: lambda: str(node), 5: lambda: [node], 6: lambda: {"value": node},
           7: lambda: random_json(rng)}.get(op, lambda: random_json(rng))()
    if not path:
        return new
    _get(value, path[:-1])[path[-1]] = new
    return value


def mutate_bytes(data: bytes, rng: random.Random, others: list[bytes] = ()) -> bytes:
    """One to four byte-level changes: flips, cuts, duplications, splices, inserted tokens."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        n = len(b)
        op = rng.randrange(8)
        if op == 0 and n:
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            b[rng.randrange(n)] = rng.choice((0, 0x7F, 0x80, 0xFF, 0x22, 0x5C, 0x7B, 0x5B, 0x0A, 0x09))
        elif op == 2 and n:
            del b[rng.randrange(n):]
        elif op == 3 and n:
            i = rng.randrange(n)
            del b[i:i + rng.randint(1, 64)]
        elif op == 4 and n:
            i, j = sorted(rng.randrange(n + 1) for _ in range(2))
            b[j:j] = b[i:j] * rng.choice((1, 2, 20))
        elif op == 5 and others:
            o = rng.choice(others)
            i, j = rng.randrange(n + 1), rng.randrange(len(o) + 1)
            b[i:] = o[j:]
        else:
            i = rng.randrange(n + 1)
            b[i:i] = rng.choice(BYTE_TOKENS)
    return bytes(b)


def json_bytes(value: Any, rng: random.Random) -> bytes:
    """``value`` as JSON, non-ASCII written raw or as \\u escapes (a lone surrogate written raw makes
    the bytes invalid UTF-8)."""
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def mutate_json_file(data: bytes, rng: random.Random, others: list[bytes] = ()) -> bytes:
    """Structural changes to a JSON or JSON-lines seed, then sometimes byte-level ones."""
    lines = None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        try:
            lines = value = [json.loads(line) for line in data.splitlines() if line.strip()]
        except (ValueError, RecursionError):  # no longer JSON (changed before): bytes only
            return mutate_bytes(data, rng, others)
    for _ in range(rng.choice((1, 1, 2, 4))):
        value = mutate_json(value, rng)
    if lines is not None and isinstance(value, list):
        out = b"\n".join(json_bytes(v, rng) for v in value)
    else:
        out = json_bytes(value, rng)
    if rng.random() < 0.2:
        out = mutate_bytes(out, rng, others)
    return out


# --------------------------------------------------------------------------- the loop
class Hang(BaseException):
    """A reader call ran past CALL_LIMIT seconds (a BaseException, so that no reader's
    ``except Exception`` turns it into an ordinary error)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def alarm(signum, frame):
        raise Hang(f"still running after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Campaign:
    """Runs ``read`` on mutated inputs for ``seconds``; collects every exception that is not a
    GeoprobeError, one per (type, raising line), with the input kept for reproduction."""

    name: str
    seconds: float
    rng: random.Random = field(init=False)
    runs: int = 0
    rejected: int = 0
    failures: dict[tuple[str, str], str] = field(default_factory=dict)

    def __post_init__(self):
        self.rng = random.Random(SEED * 1_000_003 + zlib.crc32(self.name.encode()))

    def run(self, make_input: Callable[[random.Random, int], Any], read: Callable[[Any], Any],
            keep: Callable[[Any, Path], None]) -> None:
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            case = make_input(self.rng, self.runs)
            self.runs += 1
            try:
                with time_limit(CALL_LIMIT):
                    read(case)
            except GeoprobeError:
                self.rejected += 1
            except (Exception, Hang) as exc:  # the failures this test is for
                key = (type(exc).__name__, raised_at(exc))
                if key not in self.failures:
                    where = ARTIFACTS / f"{self.name}-{len(self.failures)}"
                    shutil.rmtree(where, ignore_errors=True)
                    where.mkdir(parents=True)
                    keep(case, where)
                    first = (str(exc).splitlines() or [""])[0][:200]
                    self.failures[key] = f"{key[0]} at {key[1]}: {first} (input kept in {where})"

    def check(self) -> None:
        """No failure, and some inputs were read without error (the seeds are valid and not every
        change stops the reader at its first check)."""
        logging.getLogger(__name__).info("%s: %d inputs, %d refused with GeoprobeError", self.name,
                                         self.runs, self.rejected)
        assert not self.failures, (f"{self.name}: {len(self.failures)} kinds of non-GeoprobeError "
                                   f"exceptions in {self.runs} inputs:\n  " + "\n  ".join(self.failures.values()))
        assert self.runs > 0 and self.rejected < self.runs, (self.runs, self.rejected)


def raised_at(exc: BaseException) -> str:
    """``file:line`` of the deepest frame of the traceback inside geoprobe or adapters (where the
    reader let the exception through), else of the deepest frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if any(Path(f.filename).resolve().is_relative_to(REPO / package)
                                     for package in ("geoprobe", "adapters"))]
    frame = (ours or frames)[-1]
    name = Path(frame.filename).resolve()
    return f"{name.relative_to(REPO) if ours else name.name}:{frame.lineno}"


def budget(name: str) -> float:
    return TOTAL_SECONDS * SHARES[name]


def keep_file(case: tuple[Path, Any], where: Path) -> None:
    """Copy a case's file or folder (the first item of the case) into ``where``."""
    src = case[0]
    if src.is_dir():
        shutil.copytree(src, where / src.name, dirs_exist_ok=True)
    elif src.exists():
        shutil.copy2(src, where / src.name)
    (where / "case.txt").write_text(repr(case[1:]) + "\n", encoding="utf-8")


def mutate_file(name: str, data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """Structural changes (mostly) to a JSON or JSON-lines file, byte-level ones to any other."""
    if name.endswith((".json", ".jsonl")) and rng.random() < 0.7:
        return mutate_json_file(data, rng, others)
    return mutate_bytes(data, rng, others)


def file_maker(tmp: Path, seeds: dict[str, bytes]) -> Callable[[random.Random, int], tuple[Path]]:
    """Inputs: a mutated copy of a random seed, written under its seed's file name."""
    names = sorted(seeds)
    blobs = [seeds[n] for n in names]

    def make(rng: random.Random, i: int) -> tuple[Path]:
        name = rng.choice(names)
        path = tmp / f"{i % 4}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(mutate_file(name, seeds[name], rng, blobs))
        return (path,)

    return make


def test_campaign_reports_other_exceptions_and_hangs(tmp_path, monkeypatch):
    """The harness itself: a reader that raises KeyError on some inputs and hangs on others is
    reported with both, its inputs kept; GeoprobeErrors are counted as refusals."""
    monkeypatch.setitem(globals(), "ARTIFACTS", tmp_path / "kept")
    monkeypatch.setitem(globals(), "CALL_LIMIT", 0.2)

    def read(case):
        (path,) = case
        kind = path.read_bytes()[:1]
        if kind == b"k":
            raise KeyError("boom")
        if kind == b"h":
            time.sleep(5)
        if kind == b"g":
            raise GeoprobeError("refused")

    def make(rng, i):
        path = tmp_path / f"{i}.txt"
        path.write_bytes(b"okgh"[i % 4:i % 4 + 1])
        return (path,)

    c = Campaign("selftest", 1.0)
    c.run(make, read, keep_file)
    assert c.runs >= 4 and c.rejected >= 1
    kinds = {k[0] for k in c.failures}
    assert kinds == {"KeyError", "Hang"}
    assert (tmp_path / "kept" / "selftest-0").is_dir()
    with pytest.raises(AssertionError, match="KeyError"):
        c.check()


# --------------------------------------------------------------------------- profiles and plans
@pytest.fixture(scope="module")
def profile_seed() -> bytes:
    from profile_factory import make_profile

    profile = make_profile("model", n_layers=2, adapter_plan=True, finetune=True)
    return json.dumps(profile.to_dict()).encode()


def test_fuzz_profile_reader(tmp_path, profile_seed):
    from geoprobe.profile import GeometryProfile

    c = Campaign("profile", budget("profile"))
    c.run(file_maker(tmp_path, {"profile.json": profile_seed}),
          lambda case: GeometryProfile.load(case[0]), keep_file)
    c.check()


def test_fuzz_plan_reader(tmp_path):
    from adapters.plan import AdapterPlan

    plans = {
        "plan.json": AdapterPlan(method="gelora", r=8, layer_ranks=[4, 0, 9], rank_rule="budget",
                                 rank_ranges=[[2, 6], [0, 1], [7, 12]], id_curve=[3.1, 5.2, 6.0],
                                 reasons={"r": "budget"}, model="m"),
        "hydra.json": AdapterPlan(method="hydralora", curvature=1.3, n_heads=3,
                                  silhouettes={"2": 0.1, "3": 0.4}),
    }
    seeds = {}
    for name, plan in plans.items():
        plan.save(tmp_path / name)
        seeds[name] = (tmp_path / name).read_bytes()
    c = Campaign("plan", budget("plan"))
    c.run(file_maker(tmp_path, seeds), lambda case: AdapterPlan.load(case[0]), keep_file)
    c.check()


# --------------------------------------------------------------------------- adapter folders
def mutate_safetensors(data: bytes, rng: random.Random, others: list) -> bytes:
    """Edit the JSON header of a safetensors file (keeping or breaking its length prefix), or its bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    if rng.random() < 0.7 and 8 + n <= len(data):
        header = mutate_json_file(data[8:8 + n], rng)
        prefix = len(header) if rng.random() < 0.8 else rng.choice(EXTREME_INTS)
        return struct.pack("<Q", prefix % 2**64) + header + data[8 + n:]
    return mutate_bytes(data, rng, others)


@pytest.fixture(scope="module")
def adapter_folders(tmp_path_factory):
    import adapters
    from adapters import io

    import tiny_models

    root = tmp_path_factory.mktemp("adapters")
    base = tiny_models.tiny_llama(hidden=32)
    folders = {}
    for method in ("lora", "dora", "hyplora", "hydralora"):
        model = copy.deepcopy(base)
        folders[method] = io.save(adapters.build(model, method, r=2), root / method)
    return base, folders


def test_fuzz_adapter_folder_readers(tmp_path, adapter_folders):
    from adapters import io

    base, folders = adapter_folders
    files = ("adapter_config.json", "geoprobe_adapter.json", "adapter_model.safetensors")

    def make(rng: random.Random, i: int):
        method = rng.choice(sorted(folders))
        folder = tmp_path / str(i % 4) / method
        shutil.rmtree(folder.parent, ignore_errors=True)
        shutil.copytree(folders[method], folder)
        for _ in range(rng.choice((1, 1, 2))):
            name = rng.choice(files)
            target = folder / name
            if rng.random() < 0.05:
                target.unlink(missing_ok=True)
            elif target.exists():
                data = target.read_bytes()
                mutate = mutate_safetensors if name.endswith(".safetensors") else mutate_json_file
                target.write_bytes(mutate(data, rng, []))
        expect = rng.choice((None, None, None, "hydralora", "hyplora"))
        return folder, method, expect

    def read(case):
        folder, _, expect = case
        io.load(copy.deepcopy(base), folder, expect=expect)

    c = Campaign("adapter", budget("adapter"))
    c.run(make, read, keep_file)
    c.check()


# --------------------------------------------------------------------------- training data
def _records_json(records: list) -> bytes:
    return json.dumps(records, ensure_ascii=False, indent=1).encode()


def _jsonl(records: list) -> bytes:
    return b"\n".join(json.dumps(r, ensure_ascii=False).encode() for r in records) + b"\n"


DATA_SEEDS = {
    "AQuA.json": _records_json([
        {"instruction": "A train goes 60 km in 1 h. Answer Choices: (A) 30 (B) 60 (C) 90 (D) 120 (E) 10",
         "input": "", "output": "60 km in one hour. The answer is B.", "answer": "B"}] * 2),
    "boolq.json": _records_json([
        {"instruction": "Is water wet?\n\nAnswer format: true/false", "input": "", "output":
         "the correct answer is true", "answer": "true"}]),
    "math_10k.json": _records_json([
        {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5. The answer is 5.", "answer": "5"},
        {"instruction": "What is 7 * 6?", "input": "x", "output": "", "answer": "42"}]),
    "gsm8k.jsonl": _jsonl([
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "A box holds 1,200 pens.", "answer": "#### 1,200"}]),
    "mawps.json": _records_json([{"id": 1, "original_text": "Sam had 5 and got 3.", "equation": "x=5+3",
                                  "ans": 8}]),
    "sst2.tsv": b"sentence\tlabel\nit is good\t1\nit is bad\t0\n",
    "rte.tsv": b"0\tA man sleeps.\tA person rests.\tentailment\n1\tIt rains.\tIt is dry.\tnot_entailment\n",
    "cola.tsv": b"gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more you eat.\n",
    "mrpc.tsv": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said so.\tHe told it.\n"
                 ).encode(),
    "data.csv": b"question,answer\nWhat is 1+1?,2\n",
    "data.txt": b"instruction\toutput\nsay hi\thi\n",
}


def test_fuzz_training_data_readers(tmp_path):
    from adapters.data import KINDS, load_examples

    inner = file_maker(tmp_path, DATA_SEEDS)

    def make(rng: random.Random, i: int):
        (path,) = inner(rng, i)
        return path, rng.choice((None, None, None, *KINDS)), rng.choice((None, None, 1, 0))

    c = Campaign("data", budget("data"))
    c.run(make, lambda case: load_examples(case[0], kind=case[1], limit=case[2]), keep_file)
    c.check()


# --------------------------------------------------------------------------- corpora
CORPUS_SEEDS = {
    "notes.txt": "First paragraph of prose.\n\nSecond one, with ünïcode.\r\n\r\nThird.\n".encode(),
    "readme.md": b"# Title\n\nSome *markdown* text.\n\n- a list\n",
    "chat.jsonl": _jsonl([{"messages": [{"role": "user", "content": "hi"}, {"content": "hello"}]},
                          {"messages": [{"content": "again"}], "text": "plain"}]),
    "questions.json": _records_json([{"question": "Why?", "input": {"text": "because"}, "text": "t"},
                                     "a bare string", {"text": "only text"}]),
}
FIELDS = (None, None, "text", "question", "input.text", "messages.content", "messages.0.content",
          "messages.-1.content", "messages.²", "messages.--1", "a..b", "", ".", "0", "text.0")


def test_fuzz_corpus_readers(tmp_path):
    from geoprobe.corpus import Corpus

    inner = file_maker(tmp_path, CORPUS_SEEDS)

    def make(rng: random.Random, i: int):
        (path,) = inner(rng, i)
        if rng.random() < 0.15:  # a folder: this file beside the unchanged seeds
            folder = tmp_path / f"folder{i % 4}"
            shutil.rmtree(folder, ignore_errors=True)
            (folder / "sub").mkdir(parents=True)
            for name, data in CORPUS_SEEDS.items():
                (folder / name).write_bytes(data)
            shutil.copy2(path, folder / "sub" / path.name)
            path = folder
        return path, rng.choice(FIELDS)

    c = Campaign("corpus", budget("corpus"))
    c.run(make, lambda case: Corpus.from_path(case[0], field=case[1]), keep_file)
    c.check()


# --------------------------------------------------------------------------- GGUF files
def write_tiny_gguf(path: Path) -> None:
    """A 40-token Llama GGUF: model and tokenizer metadata (GPT-2 BPE with merges), an F32
    token_embd.weight and a Q8_0 tensor."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    tokens = ["<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
        "ab", "abc", "Ġ", "Ġa", "th", "the", "in", "ing", "er", "on", "an", "en"]
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["a b", "ab c", "Ġ a", "t h", "th e", "i n", "in g", "e r", "o n", "a n", "e n"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), 32)).astype(np.float32))
    q = quants.quantize(rng.standard_normal((4, 32)).astype(np.float32), GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_fields(path: Path) -> tuple[list[tuple[int, int]], int]:
    """(offset, width) of every integer of the header, the metadata (lengths, types, counts) and the
    tensor table, and the offset where the tensor data starts."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    spots = [(4, 4), (8, 8), (16, 8)]  # version, tensor count, metadata count
    for f in list(reader.fields.values()):
        offset = f.offset
        for part in f.parts:
            if part.dtype.kind in "iu" and part.size == 1:
                spots.append((offset, part.itemsize))
            offset += part.nbytes
    return spots, int(reader.data_offset)


def test_fuzz_gguf_readers(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from geoprobe.models import load_embeddings, load_tokenizer

    monkeypatch.setenv("GEOPROBE_CACHE", str(tmp_path / "cache"))
    seed_path = tmp_path / "seed.gguf"
    write_tiny_gguf(seed_path)
    seed = seed_path.read_bytes()
    spots, data_start = gguf_fields(seed_path)
    load_embeddings(seed_path)  # the seed reads
    from geoprobe.models.gguf import file_sha256

    file_sha256(seed_path)  # and the cache's hash index exists
    index = tmp_path / "cache" / "models" / "hashes.json"
    index_seed = index.read_bytes()

    def make(rng: random.Random, i: int):
        path = tmp_path / f"{i % 4}.gguf"
        b = bytearray(seed)
        r = rng.random()
        if r < 0.45:
            for _ in range(rng.choice((1, 1, 2, 3))):
                offset, width = rng.choice(spots)
                value = rng.choice(EXTREME_INTS) if rng.random() < 0.8 else rng.getrandbits(8 * width)
                b[offset:offset + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif r < 0.6:
            del b[rng.randrange(4, len(b)):]
        elif r < 0.8:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(4, data_start)] ^= 1 << rng.randrange(8)
        else:
            b = bytearray(b[:4] + mutate_bytes(bytes(b[4:]), rng))
        path.write_bytes(bytes(b))
        if rng.random() < 0.1:  # the cache's own files, damaged
            index.write_bytes(mutate_json_file(index_seed, rng))
        return path, rng.random() < 0.5

    def read(case):
        path, tokenizer = case
        load_embeddings(path)
        if tokenizer:
            load_tokenizer(path)

    c = Campaign("gguf", budget("gguf"))
    c.run(make, read, lambda case, where: (keep_file(case, where),
                                           shutil.copy2(index, where / "hashes.json") if index.exists() else None))
    c.check()


# --------------------------------------------------------------------------- the inputs fuzzing found
def _profile_reader(path):
    from geoprobe.profile import GeometryProfile

    return GeometryProfile.load(path)


def _plan_reader(path):
    from adapters.plan import AdapterPlan

    return AdapterPlan.load(path)


def _data_reader(path):
    from adapters.data import load_examples

    return load_examples(path)


def _corpus_reader(field):
    from geoprobe.corpus import Corpus

    return lambda path: Corpus.from_path(path, field=field)


FOUND = [  # (reader, file name, content, GeoprobeError subclass, words of the message)
    (_profile_reader, "p.json", b'{"schema": "geoprobe.profile", "seed": ' + b"9" * 5000 + b"}", "ProfileError",
     "more than 4,300 digits"),
    (_profile_reader, "p.json", b"[" * 100_000, "ProfileError", "nested too deeply"),
    (_plan_reader, "plan.json", b'{"method": ["lora"]}', "PlanError", "method must be a method name"),
    (_plan_reader, "plan.json", b'{"method": "lora", "target_modules": 5}', "PlanError", "list of module names"),
    (_plan_reader, "plan.json", b'{"method": "lora", "target_modules": "q_proj"}', "PlanError",
     "list of module names"),
    (_plan_reader, "plan.json", b'{"a": ' * 100_000, "PlanError", "nested too deeply"),
    (_data_reader, "gsm8k.json", b"[" * 100_000, "DataFormatError", "nested too deeply"),
    (_data_reader, "gsm8k.jsonl", b'{"question": "q", "answer": ' + b"1" * 5000 + b"}", "DataFormatError",
     "line 1"),
    (_data_reader, "sst2.tsv", b"sentence\tlabel\n" + b"a" * 200_000 + b"\t1\n", "DataFormatError",
     "tab-separated"),
    (_corpus_reader(None), "c.jsonl", b'{"text": ' * 50_000, "CorpusError", "nested too deeply"),
    (_corpus_reader(None), "c.json", b"[" + b"7" * 5000 + b"]", "CorpusError", "digits"),
    (_corpus_reader("messages.\u00b2"), "c.jsonl", b'{"messages": [{"content": "hi"}]}', "CorpusError",
     "no field"),
    (_corpus_reader("messages.--1"), "c.jsonl", b'{"messages": [{"content": "hi"}]}', "CorpusError",
     "no field"),
]


@pytest.mark.parametrize("reader, name, content, error, words", FOUND,
                         ids=[f"{e}-{n}-{i}" for i, (_, n, _, e, _) in enumerate(FOUND)])
def test_found_inputs_are_refused(tmp_path, reader, name, content, error, words):
    """Each input that once got past a reader as another exception now gets its GeoprobeError."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(GeoprobeError, match=words) as info:
        reader(path)
    assert type(info.value).__name__ == error


@pytest.mark.parametrize("file, change, words", [
    ("geoprobe_adapter.json", {"fingerprint": "x"}, '"fingerprint" must be an object'),
    ("geoprobe_adapter.json", {"plan": ["a"]}, '"plan" must be an object'),
    ("adapter_config.json", {"rank_pattern": [1]}, "wrong type"),
    ("adapter_config.json", {"r": {"a": 1}}, "wrong type"),
    ("adapter_config.json", {"modules_to_save": 2.5}, "wrong type"),
    ("adapter_config.json", {"megatron_config": {"a": 1}, "megatron_core": "megatron.core"}, "megatron_config"),
])
def test_found_adapter_folders_are_refused(tmp_path, adapter_folders, file, change, words):
    from adapters import io
    from geoprobe.errors import AdapterError

    base, folders = adapter_folders
    folder = shutil.copytree(folders["hyplora"], tmp_path / "adapter")
    raw = json.loads((folder / file).read_text(encoding="utf-8"))
    (folder / file).write_text(json.dumps(raw | change), encoding="utf-8")
    with pytest.raises(AdapterError, match=words):
        io.load(copy.deepcopy(base), folder)


def test_gguf_counts_past_the_end_are_refused_quickly(tmp_path, monkeypatch):
    """A metadata value retyped from string to array (its bytes then read as an item count of about
    8·10¹⁸) once kept the gguf reader looping for hours; the header check refuses it at once."""
    pytest.importorskip("gguf")
    from geoprobe.errors import ModelLoadError
    from geoprobe.models import load_embeddings, load_tokenizer

    monkeypatch.setenv("GEOPROBE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    data = bytearray(path.read_bytes())
    key = data.index(b"general.architecture") + len(b"general.architecture")
    assert struct.unpack_from("<I", data, key)[0] == 8  # a string
    struct.pack_into("<I", data, key, 9)  # now an array
    path.write_bytes(bytes(data))
    for read in (load_embeddings, load_tokenizer):
        with time_limit(10), pytest.raises(ModelLoadError, match="truncated or corrupt"):
            read(path)
