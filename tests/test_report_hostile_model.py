"""A real model whose folder name and tokenizer carry hostile strings, probed on a corpus full of
them, reported by `geoprobe report`, and opened in headless Chromium: the strings show as text and
no script runs (checked in the browser, not with a regex)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_report_browser import _open, _screenshot, driver  # noqa: E402,F401  (fixture)

from geoprobe.cli import main  # noqa: E402

pytestmark = pytest.mark.browser

SCRIPT_TOKEN = "<script>window.pwned=1</script>"
IMG_TOKEN = '"><img src=x onerror=window.pwned=2>'


def _hostile_model(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(60)] + [IMG_TOKEN]
    vocab = {SCRIPT_TOKEN: 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SCRIPT_TOKEN))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=SCRIPT_TOKEN, bos_token="<s>",
                                  eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_hostile_tokens_and_names_stay_text(tmp_path, driver):  # noqa: F811
    folder = tmp_path / IMG_TOKEN  # the model's name is its folder name
    _hostile_model(folder)
    rng = __import__("random").Random(0)
    lines = []
    for _ in range(120):
        ws = [f"w{int(rng.paretovariate(1.2)) % 60}" for _ in range(rng.randint(8, 40))]
        ws.insert(rng.randint(0, len(ws)), IMG_TOKEN)
        ws.insert(rng.randint(0, len(ws)), SCRIPT_TOKEN)
        lines.append(" ".join(ws))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(lines))
    out = tmp_path / "hostile.html"
    rc = main(["report", str(folder), "--corpus", str(corpus), "--out", str(out), "--quiet",
               "--n-prompts", "30", "--layer-positions", "300"])
    assert rc == 0 and out.exists()

    console, urls = _open(driver, out)
    assert driver.execute_script("return typeof window.pwned") == "undefined"
    assert not [e for e in console if e.get("level") == "SEVERE"], console
    assert all(u == out.resolve().as_uri() or u.startswith("data:") for u in urls), urls
    # textContent includes the collapsed <details> tables; it is what the DOM holds as text
    text = driver.execute_script("return document.body.textContent")
    assert IMG_TOKEN in text           # the model name, shown literally
    assert SCRIPT_TOKEN in text        # the tokens of the paper's words (all unknown here)
    assert not driver.find_elements("css selector", "img[src='x']")
    assert not driver.find_elements("xpath", "//script[contains(., 'pwned')]")
    _screenshot(driver, "hostile_model.png")
