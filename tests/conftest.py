"""Fixtures shared by the test modules. The tiny models themselves live in `tiny_models.py`
(importable from any test module: pytest puts `tests/` on the path, see pyproject.toml)."""
from __future__ import annotations

import pytest
import torch

import tiny_models


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread: tiny models run fastest so, and several threads on a busy
    2-core machine crawl. Opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """The lossless byte-level BPE tokenizer of `tiny_models` (Llama-like: BOS prepended, EOS
    defined, no pad), vocabulary 400."""
    return tiny_models.bpe_tokenizer()
