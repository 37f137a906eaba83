"""Fixtures shared by the test modules. The tiny models themselves live in `tiny_models.py`
(importable from any test module: pytest puts `tests/` on the path, see pyproject.toml)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings as hypothesis_settings

# Property tests draw the same examples on every CI run (a failure there is then reproducible, never
# flaky); elsewhere they explore new examples each run. GEOPROBE_HYPOTHESIS=explore/ci overrides.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.register_profile("explore", print_blob=True)
hypothesis_settings.load_profile(os.environ.get("GEOPROBE_HYPOTHESIS")
                                 or ("ci" if os.environ.get("CI", "").lower() in ("1", "true") else "explore"))

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
