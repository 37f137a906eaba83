"""Per-layer hidden states of a seeded corpus sample, and the positions to leave out of them.

Layer 0 is the embedding output and layer i the output of block i, as Hugging Face's
```output_hidden_states`` returns them. ``progress`` is a tqdm-like bar (``update``, ``total``). Special positions (BOS/CLS/SEP/padding) are dropped. The
states are gathered batch by batch into one float32 array per layer; when all layers of the sample
would not fit in ``memory_budget`` bytes they are streamed into a memory-mapped file instead, so the
resident set stays bounded by one batch plus the layer being analysed.

Massive activations (Sun et al. 2024, "Massive Activations in Large Language Models"): a few
positions — in models without BOS the first position of every sequence — act as attention sinks with
hidden-state norms two orders of magnitude above the rest. :func:`sink_mask` flags positions whose
norm exceeds ``factor`` × the layer's median norm.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 4 * 2**30


@dataclass
class HiddenStates:
    """Hidden states of sampled positions: ``layer(i)`` is an (n_positions × hidden) float32 array.

    ``doc_index``, ``position`` and ``token_id`` say where each row came from.
    """

    layers: list[np.ndarray]
    doc_index: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    memmap_path: Optional[str] = None
    _tmpdir: Optional[tempfile.TemporaryDirectory] = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_positions(self) -> int:
        return int(self.doc_index.shape[0])

    def layer(self, i: int) -> np.ndarray:
        return np.asarray(self.layers[i])

    def close(self) -> None:
        self.layers = []
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            ids.add(v)
    return ids


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length,
                    return_attention_mask=False)
    return [list(ids) for ids in enc["input_ids"]]


def collect_hidden_states(model, tokenizer, texts: Sequence[str], *, max_positions: int = 4000,
                          max_length: int = 128, batch_size: int = 8, seed: int = 0,
                          device: str = "cpu", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                          progress=None) -> HiddenStates:
    """Run ``model`` over a seeded sample of ``texts`` and keep every layer's hidden state at up to
    ``max_positions`` non-special positions.

    Documents are shuffled with ``seed`` and taken until they hold ``max_positions`` usable positions
    (each truncated to ``max_length`` tokens); when they hold more, a seeded subset is kept.
    """
    import torch

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    special = _special_ids(tokenizer)

    chosen: list[list[int]] = []
    chosen_docs: list[int] = []
    usable = 0
    for start in range(0, len(order), 16):
        idx = order[start:start + 16]
        for d, ids in zip(idx, _encode(tokenizer, [texts[i] for i in idx], max_length)):
            n_ok = sum(1 for t in ids if t not in special)
            if n_ok == 0:
                continue
            chosen.append(ids)
            chosen_docs.append(int(d))
            usable += n_ok
            if usable >= max_positions:
                break
        if usable >= max_positions:
            break

    # (document, position) of every usable position, then a seeded subset
    cand = [(k, p) for k, ids in enumerate(chosen) for p, t in enumerate(ids) if t not in special]
    keep = np.arange(len(cand))
    if len(cand) > max_positions:
        keep = np.sort(rng.choice(len(cand), size=max_positions, replace=False))
    keep_set: dict[int, list[int]] = {}
    for j in keep:
        k, p = cand[j]
        keep_set.setdefault(k, []).append(p)
    n = len(keep)
    if progress is not None and hasattr(progress, "total"):
        progress.total = len(keep_set)  # a tqdm bar: its total is known only now

    cfg = model.config
    n_layers = int(getattr(cfg, "num_hidden_layers", 0)) + 1
    hidden = int(getattr(cfg, "hidden_size"))
    need = n_layers * n * hidden * 4
    tmpdir = None
    mm_path = None
    if need > memory_budget:
        tmpdir = tempfile.TemporaryDirectory(prefix="geoprobe-hidden-")
        mm_path = os.path.join(tmpdir.name, "states.f32")
        store = np.memmap(mm_path, dtype=np.float32, mode="w+", shape=(n_layers, n, hidden))
        logger.info("hidden states need %.1f GiB > budget: streaming to %s", need / 2**30, mm_path)
    else:
        store = np.empty((n_layers, n, hidden), dtype=np.float32)

    doc_index = np.empty(n, dtype=np.int64)
    position = np.empty(n, dtype=np.int64)
    token_id = np.empty(n, dtype=np.int64)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    docs_with_rows = sorted(keep_set, key=lambda k: len(chosen[k]))  # similar lengths batch together
    row = 0
    model.eval()
    body = _backbone(model)
    with torch.inference_mode():
        for b in range(0, len(docs_with_rows), batch_size):
            batch_docs = docs_with_rows[b:b + batch_size]
            seqs = [chosen[k] for k in batch_docs]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):  # right padding: positions keep their index
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            out = body(input_ids=ids.to(device), attention_mask=mask.to(device),
                       output_hidden_states=True)
            hs = out.hidden_states
            if len(hs) != n_layers:
                raise RuntimeError(f"model returned {len(hs)} hidden states, expected {n_layers}")
            sel_b, sel_p = [], []
            for i, k in enumerate(batch_docs):
                for p in keep_set[k]:
                    sel_b.append(i)
                    sel_p.append(p)
                    doc_index[row + len(sel_b) - 1] = chosen_docs[k]
                    position[row + len(sel_b) - 1] = p
                    token_id[row + len(sel_b) - 1] = seqs[i][p]
            sb = torch.tensor(sel_b, device=hs[0].device)
            sp = torch.tensor(sel_p, device=hs[0].device)
            for layer, h in enumerate(hs):
                store[layer, row:row + len(sel_b)] = h[sb, sp].float().cpu().numpy()
            row += len(sel_b)
            if progress is not None:
                progress.update(len(batch_docs))
    if isinstance(store, np.memmap):
        store.flush()
    layers = [store[i] for i in range(n_layers)]
    return HiddenStates(layers=layers, doc_index=doc_index, position=position, token_id=token_id,
                        memmap_path=mm_path, _tmpdir=tmpdir)


def _backbone(model):
    """The model without its output head (logits over the vocabulary are not needed here)."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    if inner is not None and inner is not model and hasattr(inner, "forward"):
        return inner
    return model


def sink_mask(norms: np.ndarray, factor: float = 20.0) -> np.ndarray:
    """Boolean mask of massive-activation positions: ‖h‖ > factor × median ‖h‖ of the layer."""
    norms = np.asarray(norms, dtype=np.float64)
    med = float(np.median(norms)) if norms.size else 0.0
    if med <= 0:
        return np.zeros(norms.shape, dtype=bool)
    return norms > factor * med


def duplicate_keys(x: np.ndarray, decimals: int = 6) -> np.ndarray:
    """Integer group labels of rows that are equal after rounding to ``decimals`` (relative to the
    array's scale); rows with the same label are duplicates (repeated tokens at layer 0)."""
    x = np.asarray(x, dtype=np.float64)
    scale = float(np.max(np.abs(x))) or 1.0
    rounded = np.round(x / scale, decimals)
    _, labels = np.unique(rounded, axis=0, return_inverse=True)
    return labels.reshape(-1)
