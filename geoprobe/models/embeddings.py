"""Reading only the input-embedding matrix E ∈ R^(V×d) of a checkpoint (the table the HypLoRA
norm/frequency analysis uses, arXiv 2410.04010 §4.1) without building the model.

The tensor is found by name suffix and checked against the config's [vocab_size, hidden_size]
(:func:`find_embedding_key`); from a (possibly sharded) safetensors checkpoint only the shard that
holds it is opened and only that tensor is read (memory ≈ the tensor). The folder and hub sources
decide where the files come from; this module reads them.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import GeoprobeError, ModelLoadError
from ..records import read_json
from .safety import PICKLE_INDEX, is_pickle_weight, load_pickle, unreadable_safetensors

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Names of the input-embedding tensor in common architectures, matched against the end of the key.
EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",              # llama, mistral, qwen, gemma, phi3, opt, bart
    "embeddings.word_embeddings.weight",  # bert, roberta, deberta, electra, minilm
    "word_embeddings.weight",           # bloom, falcon
    "transformer.wte.weight",           # gpt2, gpt-j, codegen, starcoder
    "wte.weight",
    "embed_in.weight",                  # gpt-neox, pythia
    "tok_embeddings.weight",            # original llama / internlm
    "shared.weight",                    # t5
    "embedding.weight",
)


def embedding_shape(config: dict) -> tuple[Optional[int], Optional[int], bool]:
    """(vocab_size, hidden_size, tied) from a raw config.json (nested text_config honoured)."""
    sources = [config]
    for key in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(key), dict):
            sources.insert(0, config[key])

    def first(*names: str) -> Optional[int]:
        for s in sources:
            for n in names:
                if isinstance(s.get(n), int):
                    return s[n]
        return None

    vocab = first("vocab_size", "n_vocab", "padded_vocab_size")
    hidden = first("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "model_dim")
    tied = bool(next((s["tie_word_embeddings"] for s in sources if "tie_word_embeddings" in s), True))
    return vocab, hidden, tied


def find_embedding_key(names: list[str], shape_of: Any, vocab: Optional[int],
                       hidden: Optional[int], tied: bool = True) -> str:
    """Pick the input-embedding tensor among ``names``.

    Candidates are names ending in one of :data:`EMBEDDING_SUFFIXES` (in that priority order); the
    first whose shape (``shape_of(name)``) is 2-D and matches [vocab, hidden] (where known) wins. With
    tied embeddings and no candidate, ``lm_head.weight`` of that shape is used.
    """
    def fits(name: str) -> bool:
        shape = list(shape_of(name))
        if len(shape) != 2:
            return False
        if hidden is not None and shape[1] != hidden:
            return False
        return vocab is None or shape[0] == vocab

    seen: set[str] = set()
    for suffix in EMBEDDING_SUFFIXES:
        for name in names:
            if name in seen or not (name == suffix or name.endswith("." + suffix)):
                continue
            seen.add(name)
            if fits(name):
                return name
    if tied:
        for name in names:
            if name.endswith("lm_head.weight") and fits(name):
                return name
    raise ModelLoadError(
        f"no input-embedding tensor found (looked for names ending in {', '.join(EMBEDDING_SUFFIXES[:4])}"
        f", … with shape [{vocab}, {hidden}]); the checkpoint has {len(names)} tensors, e.g. "
        f"{', '.join(names[:4])}")


def safetensors_embedding(files: dict[str, str], what: str, config: dict,
                          fetch: Callable[[str], Any]) -> "torch.Tensor":
    """The embedding table from safetensors files. ``files`` maps tensor name → file name;
    ``fetch(file)`` gives a local path for a file (from a folder, or downloaded from the hub). Only the
    files holding candidate names are opened, and only the chosen tensor is read."""
    import torch
    from safetensors import safe_open

    vocab, hidden, tied = embedding_shape(config)
    handles: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        def handle(fname: str) -> Any:
            if fname not in handles:
                try:
                    handles[fname] = stack.enter_context(safe_open(str(fetch(fname)), framework="pt"))
                except GeoprobeError:
                    raise
                except Exception as exc:
                    raise unreadable_safetensors(what, fname, exc) from None
            return handles[fname]

        # Suffix/shape matching opens only the shard of each candidate name, never every shard.
        key = find_embedding_key(sorted(files), lambda n: handle(files[n]).get_slice(n).get_shape(),
                                 vocab, hidden, tied)
        try:
            tensor = handle(files[key]).get_tensor(key)
        except Exception as exc:
            raise ModelLoadError(f"{what}: cannot read {key} from {files[key]}: {exc}") from None
    logger.info("%s: read %s %s from %s", what, key, tuple(tensor.shape), files[key])
    return tensor.to(dtype=torch.float32)


def pickle_embedding(folder: Path, config: dict, what: str) -> "torch.Tensor":
    """The embedding table from pickle weights in ``folder`` (``pytorch_model.bin.index.json`` or one
    weight file), read with ``torch.load(weights_only=True, mmap=True)``. The caller has checked that
    pickle weights are allowed."""
    import torch

    index = folder / PICKLE_INDEX
    if index.is_file():
        weight_map = read_json(index, what, error=ModelLoadError).get("weight_map") or {}
    else:
        files = [p for p in folder.iterdir() if p.is_file() and is_pickle_weight(p.name)]
        if len(files) != 1:
            raise ModelLoadError(f"{what}: expected one pickle weight file, found {len(files)}")
        weight_map = None
    vocab, hidden, tied = embedding_shape(config)
    loaded: dict[str, dict] = {}

    def state(fname: str) -> dict:
        if fname not in loaded:
            loaded[fname] = load_pickle(folder / fname, what, mmap=True)
        return loaded[fname]

    if weight_map is None:
        weight_map = {k: files[0].name for k in state(files[0].name)}
    key = find_embedding_key(sorted(weight_map), lambda n: tuple(state(weight_map[n])[n].shape),
                             vocab, hidden, tied)
    return state(weight_map[key])[key].detach().to(torch.float32).clone()
