"""A local model folder: ``config.json`` beside safetensors weights (or pickle weights, only when
allowed) and the tokenizer files."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..errors import ModelLoadError
from ..records import read_json
from .common import LoadedModel, finish, from_pretrained, load_weights, tokenizer_from
from .embeddings import pickle_embedding, safetensors_embedding
from .precision import checkpoint_dtype, resolve_dtype
from .safety import SAFETENSORS_INDEX, refuse_pickle, refuse_remote_code, safetensors_keys, weight_files
from .shards import Checkpoint, read_weight_map

if TYPE_CHECKING:
    import torch


def _what(folder: Path) -> str:
    return f"model folder {folder}"


def _no_weights(what: str) -> ModelLoadError:
    return ModelLoadError(f"{what} has no weights (no *.safetensors, no pytorch_model.bin)")


def load_folder(folder: Path, *, device: str, dtype: Any, allow_pickle: bool,
                trust_remote_code: bool, name: str, source: str,
                num_labels: Optional[int] = None) -> LoadedModel:
    """Build the model and tokenizer of ``folder`` after the safety checks (remote code, pickle,
    every shard the index names present, every safetensors header readable and its file complete);
    an encoder gets a classification head of ``num_labels`` classes when that is given
    (:func:`~geoprobe.models.common.load_weights`). ``dtype`` None or "auto" is resolved against the
    checkpoint's dtype and ``device`` (:func:`~geoprobe.models.precision.resolve_dtype`)."""
    from transformers import AutoConfig

    what = _what(folder)
    raw = read_json(folder / "config.json", what, error=ModelLoadError)
    refuse_remote_code(what, raw.get("auto_map"), trust_remote_code)
    safe, pickled = weight_files(folder)
    weights_dtype = None
    if safe:
        weights_dtype = Checkpoint.from_folder(folder, what).float_dtype()
    elif pickled:
        refuse_pickle(what, [p.name for p in pickled], allow_pickle)
    else:
        raise _no_weights(what)
    dtype = resolve_dtype(dtype, device, checkpoint_dtype(raw, weights_dtype))
    config = from_pretrained(AutoConfig, folder, what, trust_remote_code=trust_remote_code)
    model, causal = load_weights(config, folder, what, dtype=dtype, use_safetensors=bool(safe), device=device,
                                 trust_remote_code=trust_remote_code, num_labels=num_labels)
    tokenizer = tokenizer_from(folder, what, trust_remote_code=trust_remote_code)
    return finish(model, tokenizer, name=name, source=source, device=device, dtype=dtype,
                  causal=causal)


def folder_tokenizer(folder: Path, *, trust_remote_code: bool) -> Any:
    """Only the tokenizer of ``folder``."""
    return tokenizer_from(folder, _what(folder), trust_remote_code=trust_remote_code)


def _present(folder: Path, fname: str, what: str) -> Path:
    """``folder/fname``, or a :class:`ModelLoadError` saying the index names a file that is not there."""
    path = folder / fname
    if not path.is_file():
        raise ModelLoadError(f"{what}: {SAFETENSORS_INDEX} puts the input-embedding tensor in {fname}, which is "
                             "not in the folder; download it again")
    return path


def folder_embeddings(folder: Path, *, allow_pickle: bool) -> "torch.Tensor":
    """The input-embedding table of ``folder`` (sharded safetensors through the index's weight map,
    plain safetensors through their headers, pickle weights only when allowed)."""
    what = _what(folder)
    config = read_json(folder / "config.json", what, error=ModelLoadError)
    weight_map = read_weight_map(folder, what)
    if weight_map is not None:
        return safetensors_embedding(weight_map, what, config, lambda f: _present(folder, f, what))
    safe, pickled = weight_files(folder)
    if safe:
        files = {k: f.name for f in safe for k in safetensors_keys(f, what)}
        return safetensors_embedding(files, what, config, lambda f: folder / f)
    if pickled:
        refuse_pickle(what, [p.name for p in pickled], allow_pickle)
        return pickle_embedding(folder, config, what)
    raise _no_weights(what)
