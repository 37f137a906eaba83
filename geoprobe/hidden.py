"""Per-layer hidden states of a seeded corpus sample, the positions to leave out of them, and
pooled prompt embeddings.

:func:`hidden_states` (``gp.hidden_states``) takes a loaded model and a corpus, as ``gp.probe`` does;
:func:`collect_hidden_states` takes the torch model, its tokenizer and the texts.

Layer 0 is the embedding output and layer i the output of block i, as Hugging Face's
``output_hidden_states`` returns them. ``progress`` is a tqdm-like bar (``update``, ``total``).
Special positions (BOS/CLS/SEP/padding) are dropped. The states are gathered batch by batch into one
float32 array per layer (a streamed model, :mod:`geoprobe.models.streamed`, gives them layer by layer
instead: every batch through one layer before the next layer is read; the sample and its rows are the
same); only the kept rows are cast to float32, the model computes in its own dtype; when all layers of the sample would not fit in ``memory_budget`` bytes they
are streamed into a memory-mapped file instead, so the resident set stays bounded by one batch plus
the layer being analysed.

Massive activations (Sun et al. 2024, "Massive Activations in Large Language Models"): a few
positions — in models without BOS the first position of every sequence — act as attention sinks with
hidden-state norms two orders of magnitude above the rest. :func:`sink_mask` flags positions whose
norm exceeds ``factor`` × the layer's median norm (default :data:`SINK_FACTOR`).

:func:`prompt_embeddings` mean-pools the last layer over each of a seeded sample of texts, through the
same batched forward passes.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np

from .runtime import progress as progress_bar

if TYPE_CHECKING:
    import torch

    from .corpus import Corpus
    from .models import LoadedModel

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 4 * 2**30

DEFAULT_POSITIONS = 1200
"""Positions sampled per layer by default, as :class:`geoprobe.pipeline.ProbeSettings` samples them."""

SINK_FACTOR = 8.0
"""Default sink threshold: a position is an attention sink when its hidden-state norm exceeds this
many times the layer's median norm. Sinks sit two orders of magnitude above the rest (SmolLM2: about
2.7e4 against 2e2, METHODS.md §4b), far above 8; the ordinary spread of norms within a layer stays
well below it. :class:`geoprobe.pipeline.ProbeSettings` records it in every profile."""


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

    def __repr__(self) -> str:
        width = self.layers[0].shape[1] if self.layers else 0
        where = f", memory-mapped at {self.memmap_path}" if self.memmap_path else ""
        return (f"HiddenStates({self.n_layers} layers × {self.n_positions} positions × {width}, "
                f"{len(np.unique(self.doc_index))} documents{where})")

    def close(self) -> None:
        """Drop the arrays and remove the memory-mapped file, if any."""
        self.layers = []
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> "HiddenStates":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def hidden_states(lm: "LoadedModel", corpus: "Corpus", *, max_positions: int = DEFAULT_POSITIONS,
                  max_length: int = 128, batch_size: int = 8, seed: int = 0,
                  device: Optional[str] = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                  progress: bool = False, min_documents: int = 1) -> HiddenStates:
    """Hidden states of every layer at up to ``max_positions`` seeded non-special positions of
    ``corpus`` (a :class:`geoprobe.corpus.Corpus`), read from ``lm`` (a
    :class:`geoprobe.models.LoadedModel`, or a :class:`geoprobe.models.streamed.StreamedModel`, which
    reads one layer at a time from the shards) — the sample ``gp.probe`` measures per layer.

    ``hs.layer(i)`` is layer i's (positions × hidden) float32 array (0 = embedding output, i = output
    of block i); ``hs.doc_index``, ``hs.position`` and ``hs.token_id`` say where each row came from.
    Documents are shuffled with ``seed`` and truncated to ``max_length`` tokens, the forward passes run
    in batches of ``batch_size`` on ``device`` (default: the model's device), and states beyond
    ``memory_budget`` bytes go to a memory-mapped temporary file (``hs.close()`` removes it).
    ``progress`` shows a bar on stderr. Same arguments as :func:`collect_hidden_states`, which this
    calls with ``lm.model``, ``lm.tokenizer`` and ``corpus.documents``; ``seed`` may be an int or a
    ``numpy.random.SeedSequence``.
    """
    bar = progress_bar(len(corpus), "hidden states", enabled=progress)
    source = lm if getattr(lm, "streamed", False) else lm.model
    try:
        return collect_hidden_states(source, lm.tokenizer, list(corpus.documents),
                                     max_positions=max_positions, max_length=max_length,
                                     batch_size=batch_size, seed=seed,
                                     device=str(device or lm.device), memory_budget=memory_budget,
                                     progress=bar, min_documents=min_documents)
    finally:
        bar.close()


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
                          max_length: int = 128, batch_size: int = 8,
                          seed: "int | np.random.SeedSequence" = 0,
                          device: str = "cpu", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                          progress=None, min_documents: int = 1) -> HiddenStates:
    """Run ``model`` over a seeded sample of ``texts`` and keep every layer's hidden state at up to
    ``max_positions`` non-special positions.

    Documents are shuffled with ``seed`` and taken until they hold ``max_positions`` usable positions
    and number at least ``min_documents`` (each truncated to ``max_length`` tokens); when they hold
    more positions, a seeded subset of them is kept.
    """
    rng = np.random.default_rng(seed)
    special = _special_ids(tokenizer)
    chosen, chosen_docs = _choose_documents(tokenizer, texts, rng.permutation(len(texts)), special,
                                            max_positions, max_length, min_documents)
    keep_set, n = _sample_positions(chosen, special, rng, max_positions)
    streamed = bool(getattr(model, "streamed", False))
    n_layers = int(getattr(model.config, "num_hidden_layers", 0)) + 1
    if progress is not None and hasattr(progress, "total"):
        progress.total = n_layers - 1 if streamed else len(keep_set)  # a tqdm bar: known only now
    store, mm_path, tmpdir = _allocate(n_layers, n, int(getattr(model.config, "hidden_size")),
                                       memory_budget)
    docs_with_rows = sorted(keep_set, key=lambda k: len(chosen[k]))  # similar lengths batch together
    seqs = [chosen[k] for k in docs_with_rows]
    picks = _picks(docs_with_rows, keep_set, batch_size)
    rows = [p for batch in picks for p in batch]
    doc_index = np.asarray([chosen_docs[docs_with_rows[i]] for i, _ in rows], dtype=np.int64)
    position = np.asarray([p for _, p in rows], dtype=np.int64)
    token_id = np.asarray([seqs[i][p] for i, p in rows], dtype=np.int64)
    gather = _gather_streamed if streamed else _gather_whole
    gather(model, store, seqs, picks, batch_size=batch_size, pad_id=_pad_id(tokenizer), device=device,
           progress=progress)
    if isinstance(store, np.memmap):
        store.flush()
    return HiddenStates(layers=[store[i] for i in range(n_layers)], doc_index=doc_index,
                        position=position, token_id=token_id, memmap_path=mm_path, _tmpdir=tmpdir)


def _picks(docs_with_rows: list[int], keep_set: dict[int, list[int]],
           batch_size: int) -> list[list[tuple[int, int]]]:
    """Per batch of ``batch_size`` sequences, the kept (sequence index, position) pairs in row order."""
    out = []
    for start in range(0, len(docs_with_rows), batch_size):
        out.append([(start + j, p) for j, k in enumerate(docs_with_rows[start:start + batch_size])
                    for p in keep_set[k]])
    return out


def _rows_of(h: "torch.Tensor", batch: list[tuple[int, int]], start: int) -> np.ndarray:
    """The kept rows of one batch's (batch × width × hidden) states, as float32 on the host (the cast
    comes after the selection: the model's own dtype until then)."""
    import torch

    sb = torch.tensor([i - start for i, _ in batch], device=h.device)
    sp = torch.tensor([p for _, p in batch], device=h.device)
    return h[sb, sp].float().cpu().numpy()


def _gather_whole(model, store: np.ndarray, seqs: list[list[int]], picks: list, *, batch_size: int,
                  pad_id: int, device, progress) -> None:
    """Every layer's kept rows from forward passes of the whole model, batch by batch."""
    import torch

    n_layers = store.shape[0]
    row = 0
    with torch.inference_mode():
        for (start, hs, _), batch in zip(_forward_batches(model, seqs, batch_size=batch_size,
                                                          pad_id=pad_id, device=device), picks):
            if len(hs) != n_layers:
                raise RuntimeError(f"model returned {len(hs)} hidden states, expected {n_layers}")
            for layer, h in enumerate(hs):
                store[layer, row:row + len(batch)] = _rows_of(h, batch, start)
            row += len(batch)
            if progress is not None:
                progress.update(min(batch_size, len(seqs) - start))


def _gather_streamed(model, store: np.ndarray, seqs: list[list[int]], picks: list, *, batch_size: int,
                     pad_id: int, device, progress) -> None:
    """Every layer's kept rows from a :class:`~geoprobe.models.streamed.StreamedModel`, layer by layer
    (all batches through one layer before the next is read)."""
    batches = [_pad_batch(seqs[b:b + batch_size], pad_id)
               for b in range(0, len(seqs), batch_size)]
    for layer, states in model.layer_states(batches, progress=progress):
        row = 0
        for b, (h, batch) in enumerate(zip(states, picks)):
            store[layer, row:row + len(batch)] = _rows_of(h, batch, b * batch_size)
            row += len(batch)


def _choose_documents(tokenizer, texts: Sequence[str], order: np.ndarray, special: set[int],
                      max_positions: int, max_length: int,
                      min_documents: int = 1) -> tuple[list[list[int]], list[int]]:
    """Token ids and corpus indices of the documents taken, in ``order``, until they hold
    ``max_positions`` non-special positions and number at least ``min_documents`` (documents with
    no such position are passed over)."""
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
            if usable >= max_positions and len(chosen) >= min_documents:
                return chosen, chosen_docs
    return chosen, chosen_docs


def _sample_positions(chosen: list[list[int]], special: set[int], rng: np.random.Generator,
                      max_positions: int) -> tuple[dict[int, list[int]], int]:
    """The kept positions of each chosen document (a seeded subset of ``max_positions`` of the
    usable ones when there are more) and their total number."""
    cand = [(k, p) for k, ids in enumerate(chosen) for p, t in enumerate(ids) if t not in special]
    keep = np.arange(len(cand))
    if len(cand) > max_positions:
        keep = np.sort(rng.choice(len(cand), size=max_positions, replace=False))
    keep_set: dict[int, list[int]] = {}
    for j in keep:
        k, p = cand[j]
        keep_set.setdefault(k, []).append(p)
    return keep_set, len(keep)


def _allocate(n_layers: int, n: int, hidden: int, memory_budget: int
              ) -> tuple[np.ndarray, Optional[str], Optional[tempfile.TemporaryDirectory]]:
    """The (layers × positions × hidden) float32 store: in memory, or a memory-mapped temporary file
    when it would take more than ``memory_budget`` bytes. Returns (store, file path, its folder)."""
    need = n_layers * n * hidden * 4
    if need <= memory_budget:
        return np.empty((n_layers, n, hidden), dtype=np.float32), None, None
    tmpdir = tempfile.TemporaryDirectory(prefix="geoprobe-hidden-")
    mm_path = os.path.join(tmpdir.name, "states.f32")
    store = np.memmap(mm_path, dtype=np.float32, mode="w+", shape=(n_layers, n, hidden))
    logger.info("hidden states need %.1f GiB > budget: streaming to %s", need / 2**30, mm_path)
    return store, mm_path, tmpdir


def _pad_id(tokenizer) -> int:
    """The padding token id: the tokenizer's pad token, else its EOS token, else 0."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return pad_id


def _forward_batches(model, seqs: Sequence[Sequence[int]], *, batch_size: int, pad_id: int,
                     device) -> Iterator[tuple[int, tuple, "torch.Tensor"]]:
    """Forward passes of ``model``'s backbone over ``seqs`` in batches of ``batch_size``, right-padded
    (positions keep their index) with an attention mask; yields the index of the batch's first
    sequence, the batch's hidden states (one (batch × width × hidden) tensor per layer) and its
    (batch × width) mask, 1 at real tokens. The caller holds ``torch.inference_mode()``."""
    model.eval()
    body = _backbone(model)
    for b in range(0, len(seqs), batch_size):
        ids, mask = _pad_batch(seqs[b:b + batch_size], pad_id)
        out = body(input_ids=ids.to(device), attention_mask=mask.to(device),
                   output_hidden_states=True)
        yield b, out.hidden_states, mask


def _pad_batch(batch: Sequence[Sequence[int]], pad_id: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(ids, mask) of ``batch`` right-padded with ``pad_id`` to its longest sequence (positions keep
    their index), the mask 1 at real tokens."""
    import torch

    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def embedding_sample(n: int, max_examples: int, seed: int) -> np.ndarray:
    """The indices of the texts :func:`prompt_embeddings` embeds, in its order: the first ``max_examples``
    of a permutation of ``n`` drawn with ``np.random.default_rng(seed)``."""
    return np.random.default_rng(seed).permutation(n)[:max_examples]


def prompt_embeddings(model, tokenizer, texts: Sequence[str], *, max_examples: int = 1000,
                      batch_size: int = 16, max_length: int = 128, seed: int = 0) -> np.ndarray:
    """Mean-pooled last hidden state of a seeded sample of ``texts`` (the planner's example
    embeddings for choosing HydraLoRA heads).

    The sample is the first ``max_examples`` texts of a permutation drawn with
    ``np.random.default_rng(seed)``, in that order; each is tokenized with the tokenizer's special
    tokens and truncated to ``max_length`` tokens, and its embedding is
    e = Σ_p h_L[p] / (number of positions), the mean over its positions of the last layer's hidden
    state h_L (computed in batches of ``batch_size``, padding masked out). Returns a float32 array of
    shape (len(sample), hidden), row i for the i-th sampled text. The forward passes run on the
    device of the model's first parameter.
    """
    import torch

    idx = embedding_sample(len(texts), max_examples, seed)
    seqs = _encode(tokenizer, [texts[i] for i in idx], max_length)
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for _, hs, mask in _forward_batches(model, seqs, batch_size=batch_size,
                                            pad_id=_pad_id(tokenizer), device=device):
            h = hs[-1].float()
            m = mask.to(h.device).unsqueeze(-1).float()
            out.append(((h * m).sum(1) / m.sum(1)).cpu().numpy())
    return np.concatenate(out, axis=0)


def _backbone(model):
    """The model without its output head (logits over the vocabulary are not needed here)."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    if inner is not None and inner is not model and hasattr(inner, "forward"):
        return inner
    return model


def sink_mask(norms: np.ndarray, factor: float = SINK_FACTOR) -> np.ndarray:
    """Boolean mask of massive-activation positions: ‖h‖ > factor × median ‖h‖ of the layer."""
    norms = np.asarray(norms, dtype=np.float64)
    med = float(np.median(norms)) if norms.size else 0.0
    if med <= 0:
        return np.zeros(norms.shape, dtype=bool)
    return norms > factor * med
