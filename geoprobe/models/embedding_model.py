"""A model opened for its input embeddings alone: the tokenizer, the input-embedding table (one tensor
read from one shard, :func:`geoprobe.models.load_embeddings`) and the model's description, without
building the model. Frequency, norms and token-embedding δ run on it in the memory of that table (an
8B Llama-3: 128,256 × 4,096 float32, 2.1 GB) on any machine; it has no hidden states."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from ..errors import GeoprobeError, ModelLoadError
from ..profile import ModelInfo
from ..records import read_json
from .causal import is_causal_lm
from .common import special_token_ids
from .precision import checkpoint_dtype
from .safety import SAFETENSORS_INDEX
from .shards import DTYPE_BYTES, Checkpoint, read_header, read_weight_map

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingModel:
    """``tokenizer``, ``name``, ``source``, ``info`` as a :class:`~geoprobe.models.LoadedModel` has
    them, and ``table``, the input-embedding matrix (vocab × hidden, float32, CPU)."""

    tokenizer: Any
    name: str
    source: str
    info: ModelInfo
    table: Any

    has_hidden_states: ClassVar[bool] = False

    def input_embeddings(self) -> "torch.Tensor":
        """The input-embedding table as float32 on the CPU (the one held, not a copy)."""
        return self.table

    def special_token_ids(self) -> list[int]:
        return special_token_ids(self.tokenizer)


def model_info(name: str, source: str, config: dict, table: "torch.Tensor", *, n_parameters: int,
               dtype: Optional[str], causal: Optional[bool] = None) -> ModelInfo:
    """The :class:`ModelInfo` of a model known by its raw ``config`` and input-embedding ``table``
    (``causal``: whether it is a causal LM; None lets :func:`~geoprobe.models.is_causal_lm` judge the
    config)."""
    from .common import config_value

    ns = SimpleNamespace(**{k: v for k, v in config.items() if isinstance(k, str)})
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    causal = is_causal_lm(ns) if causal is None else causal
    arch = (config.get("architectures") or [config.get("model_type") or "unknown"])[0]
    n_layers = config_value(SimpleNamespace(**text), "num_hidden_layers", "n_layer", "num_layers") or \
        config_value(ns, "num_hidden_layers", "n_layer", "num_layers", "n_layers") or 0
    return ModelInfo(name=name, source=source, architecture=str(arch),
                     model_type=str(config.get("model_type", "")), n_parameters=int(n_parameters),
                     vocab_size=int(table.shape[0]), hidden_size=int(table.shape[1]), n_layers=int(n_layers),
                     dtype=dtype or "float32",
                     is_encoder=not causal and not bool(config.get("is_encoder_decoder", False)))


def folder_parameters(folder: Path, what: str) -> int:
    """Parameters of the safetensors checkpoint in ``folder``, from its headers; when the index names
    shards that are not there, from the index's ``metadata.total_size`` (bytes) at the dtype of the
    shards present; 0 when neither is known."""
    try:
        return Checkpoint.from_folder(folder, what).n_parameters
    except ModelLoadError:
        pass
    with contextlib.suppress(GeoprobeError, OSError, ValueError, KeyError, TypeError, StopIteration):
        weight_map = read_weight_map(folder, what) or {}
        total = int(read_json(folder / SAFETENSORS_INDEX, what)["metadata"]["total_size"])
        present = next(folder / f for f in sorted(set(weight_map.values())) if (folder / f).is_file())
        dtypes = [t.dtype for t in read_header(present, what).values()]
        return total // DTYPE_BYTES.get(max(set(dtypes), key=dtypes.count), 2)
    return 0


def open_folder(folder: Path, table: "torch.Tensor", tokenizer: Any, *, name: str, source: str) -> EmbeddingModel:
    """The embedding model of a local folder."""
    what = f"model folder {folder}"
    config = read_json(folder / "config.json", what, error=ModelLoadError)
    n_params = folder_parameters(folder, what)
    weights = None
    with contextlib.suppress(ModelLoadError):
        weights = Checkpoint.from_folder(folder, what).float_dtype()
    info = model_info(name, source, config, table, n_parameters=n_params, dtype=checkpoint_dtype(config, weights))
    return EmbeddingModel(tokenizer=tokenizer, name=name, source=source, info=info, table=table)


def open_gguf(path: Path, table: "torch.Tensor", tokenizer: Any, *, name: str, source: str) -> EmbeddingModel:
    """The embedding model of a GGUF file (its description from the GGUF metadata; the table was
    dequantised to float32)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        block = reader.fields.get(f"{arch}.block_count")
        n_layers = int(block.parts[block.data[0]][0]) if block is not None else 0
        n_params = sum(int(t.n_elements) for t in reader.tensors)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the metadata of GGUF file {path}: {exc}") from None
    config = {"model_type": arch, "architectures": [f"{arch} (GGUF)"], "num_hidden_layers": n_layers}
    # geoprobe reads every GGUF file as a causal LM (load_gguf), so it is described as one here too
    info = model_info(name, source, config, table, n_parameters=n_params, dtype="float32", causal=True)
    return EmbeddingModel(tokenizer=tokenizer, name=name, source=source, info=info, table=table)


def hub_parameters(repo: str, revision: Optional[str]) -> int:
    """Parameters of hub repository ``repo`` from its safetensors metadata (header ranges, no weights
    downloaded); 0 when the hub cannot tell."""
    from .hub import hub_offline

    if hub_offline():
        return 0
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(repo, revision=revision)
        return int(sum(meta.parameter_count.values()))
    except Exception as exc:  # unreachable hub, no safetensors: the count is only descriptive
        logger.info("parameter count of %s unknown: %s", repo, exc)
        return 0


def open_hub(repo: str, table: "torch.Tensor", tokenizer: Any, *, revision: Optional[str],
             cache_dir: Any) -> EmbeddingModel:
    """The embedding model of a hub repository (its config from the local cache, or downloaded)."""
    from huggingface_hub import hf_hub_download

    what = f"hub model {repo!r}"
    try:
        config_path = hf_hub_download(repo, "config.json", revision=revision, cache_dir=cache_dir)
    except Exception as exc:
        raise ModelLoadError(f"{what}: cannot read config.json: {exc}") from None
    config = read_json(config_path, what, error=ModelLoadError)
    info = model_info(repo, "hub", config, table, n_parameters=hub_parameters(repo, revision),
                      dtype=checkpoint_dtype(config))
    return EmbeddingModel(tokenizer=tokenizer, name=repo, source="hub", info=info, table=table)
