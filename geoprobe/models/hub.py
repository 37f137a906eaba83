"""A Hugging Face hub id. A copy in the local Hugging Face cache is used first; otherwise the hub is
asked once (``HfApi.model_info`` with a ``HUB_TIMEOUT_S`` timeout) so that an unreachable hub or a
missing repository fails in about a second instead of after the download client's minutes of
retries. Offline mode (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``) is honoured without a network
call."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..errors import GeoprobeError, ModelLoadError, ModelNotFoundError, UnsafeModelError
from ..records import read_json
from ..runtime import env_true
from .common import LoadedModel, finish, from_pretrained, load_weights, tokenizer_from
from .embeddings import pickle_embedding, safetensors_embedding
from .precision import checkpoint_dtype, resolve_dtype
from .safety import (PICKLE_INDEX, SAFETENSORS_INDEX, is_pickle_weight, refuse_pickle,
                     refuse_remote_code, safetensors_keys)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

HUB_TIMEOUT_S = 10.0


def _what(repo: str) -> str:
    return f"hub model {repo!r}"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE forbids network access (a yes-spelling in the
    environment, or huggingface_hub's own reading of it at import)."""
    if env_true("HF_HUB_OFFLINE") or env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_files(repo: str, revision: Optional[str]) -> list[str]:
    """The file names of hub repository ``repo``, asked once with a short timeout.

    Raises ModelNotFoundError saying whether the hub was unreachable, has no such repository or
    revision, or the repository is gated.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub import errors as hf_errors

    endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")
    if hub_offline():
        raise ModelNotFoundError(
            f"model {repo!r} was not found locally (no such file or folder, not in the Hugging Face "
            "cache) and offline mode (HF_HUB_OFFLINE) forbids the hub. Pass a local folder or "
            ".gguf file, or unset HF_HUB_OFFLINE.")
    try:
        info = HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except hf_errors.GatedRepoError:
        raise ModelNotFoundError(
            f"model {repo!r} is gated on the hub: accept its terms on {endpoint}/{repo} and log in "
            "with `hf auth login`") from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {repo!r} was not found locally and the hub ({endpoint}) has no such model "
            "(check the spelling; private models need `hf auth login`)") from None
    except hf_errors.RevisionNotFoundError:
        raise ModelNotFoundError(f"model {repo!r} has no revision {revision!r} on the hub") from None
    except hf_errors.HfHubHTTPError as exc:
        raise ModelNotFoundError(
            f"model {repo!r} was not found locally and the hub ({endpoint}) answered with an error: "
            f"{str(exc).splitlines()[0]}") from None
    except Exception as exc:  # network errors: DNS, refused, timeout, proxy
        raise ModelNotFoundError(
            f"model {repo!r} was not found locally and the hub ({endpoint}) is unreachable "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}). "
            "Pass a local folder or .gguf file, or check the network.") from None
    return [s.rfilename for s in (info.siblings or [])]


def hub_cached_config(repo: str, revision: Optional[str], cache_dir: Any) -> Optional[Path]:
    """The config.json of ``repo`` in the local Hugging Face cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir, revision=revision)
    return Path(hit) if isinstance(hit, str) else None


def _pickled(files: list[str]) -> list[str]:
    return [f for f in files if "/" not in f and is_pickle_weight(f)]


def _no_weights(what: str, files: list[str]) -> ModelLoadError:
    ggufs = [f for f in files if f.endswith(".gguf")]
    hint = f" It holds GGUF files ({', '.join(ggufs[:3])}): download one and pass its path." if ggufs else ""
    return ModelLoadError(f"{what} has no safetensors or PyTorch weights.{hint}")


# --------------------------------------------------------------------------- the whole model
def load_hub(repo: str, *, device: str, dtype: Any, allow_pickle: bool, trust_remote_code: bool,
             cache_dir: Any, revision: Optional[str], num_labels: Optional[int] = None) -> LoadedModel:
    """Build the model of ``repo``: from the local cache when it is complete there, else after one
    listing of the repository (pickle-only repositories refused unless allowed); an encoder gets a
    classification head of ``num_labels`` classes when that is given."""
    kw = dict(device=device, dtype=dtype, trust_remote_code=trust_remote_code, cache_dir=cache_dir,
              revision=revision, num_labels=num_labels)
    if hub_cached_config(repo, revision, cache_dir) is not None:
        try:
            return _load_hub_files(repo, local_files_only=True,
                                   use_safetensors=None if allow_pickle else True, **kw)
        except UnsafeModelError:
            raise
        except GeoprobeError as exc:
            if hub_offline():
                raise ModelNotFoundError(
                    f"model {repo!r} is only partly in the local Hugging Face cache and offline mode "
                    f"forbids downloading the rest ({exc})") from None
            logger.info("local cache copy of %s incomplete (%s); asking the hub", repo, exc)
    files = hub_files(repo, revision)
    safe = [f for f in files if f.endswith(".safetensors")]
    if not safe:
        pickled = _pickled(files)
        if not pickled:
            raise _no_weights(_what(repo), files)
        refuse_pickle(_what(repo), pickled, allow_pickle)
    return _load_hub_files(repo, local_files_only=False, use_safetensors=bool(safe), **kw)


def _load_hub_files(repo: str, *, device: str, dtype: Any, trust_remote_code: bool, cache_dir: Any,
                    revision: Optional[str], local_files_only: bool,
                    use_safetensors: Optional[bool], num_labels: Optional[int] = None) -> LoadedModel:
    from transformers import AutoConfig

    what = _what(repo)
    kw = dict(cache_dir=cache_dir, revision=revision, local_files_only=local_files_only,
              trust_remote_code=trust_remote_code)
    config = from_pretrained(AutoConfig, repo, what, **kw)
    refuse_remote_code(what, getattr(config, "auto_map", None), trust_remote_code)
    dtype = resolve_dtype(dtype, device, checkpoint_dtype(config))
    model, causal = load_weights(config, repo, what, dtype=dtype, use_safetensors=use_safetensors, device=device,
                                 num_labels=num_labels, **kw)
    tokenizer = tokenizer_from(repo, what, **kw)
    return finish(model, tokenizer, name=repo, source="hub", device=device, dtype=dtype,
                  causal=causal)


def hub_tokenizer(repo: str, *, trust_remote_code: bool, cache_dir: Any,
                  revision: Optional[str]) -> Any:
    """Only the tokenizer of ``repo`` (the hub is asked once when the cache has no copy)."""
    if hub_cached_config(repo, revision, cache_dir) is None:
        hub_files(repo, revision)
    return tokenizer_from(repo, _what(repo), trust_remote_code=trust_remote_code,
                          cache_dir=cache_dir, revision=revision)


# --------------------------------------------------------------------------- embeddings only
class _HubFiles:
    """Single files of one repository: from the local Hugging Face cache when there, else downloaded;
    the repository's listing is asked at most once (only when something is not cached)."""

    def __init__(self, repo: str, revision: Optional[str], cache_dir: Any) -> None:
        self.repo, self.revision, self.cache_dir = repo, revision, cache_dir
        self._listing: list[str] = []

    def listing(self) -> list[str]:
        if not self._listing:
            self._listing.extend(hub_files(self.repo, self.revision) or ["config.json"])
        return self._listing

    def fetch(self, fname: str) -> str:
        """Local path of ``fname``; FileNotFoundError when the repository has no such file."""
        from huggingface_hub import hf_hub_download

        kw = dict(revision=self.revision, cache_dir=self.cache_dir)
        with contextlib.suppress(Exception):
            return hf_hub_download(self.repo, fname, local_files_only=True, **kw)
        if hub_offline() and fname != "config.json":
            raise FileNotFoundError(fname)
        if fname not in self.listing():
            raise FileNotFoundError(fname)
        try:
            return hf_hub_download(self.repo, fname, **kw)
        except Exception as exc:
            raise ModelNotFoundError(f"{_what(self.repo)}: cannot download {fname}: {exc}") from None

    def optional(self, fname: str) -> Optional[Path]:
        """Local path of ``fname``, or None when the repository has no such file."""
        try:
            return Path(self.fetch(fname))
        except FileNotFoundError:
            return None


def hub_embeddings(repo: str, *, allow_pickle: bool, cache_dir: Any,
                   revision: Optional[str]) -> "torch.Tensor":
    """Embedding-only read from the hub: config, index and the one shard holding the tensor are
    taken from the local Hugging Face cache when there, else downloaded (never the other shards)."""
    what = _what(repo)
    files = _HubFiles(repo, revision, cache_dir)
    try:
        config_path = Path(files.fetch("config.json"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{what} has no config.json") from None
    config = read_json(config_path, what, error=ModelLoadError)
    tensor = _safetensors_embedding(files, what, config)
    if tensor is not None:
        return tensor
    if hub_offline():
        raise ModelNotFoundError(
            f"{what}: its weights are not in the local Hugging Face cache and offline mode "
            "(HF_HUB_OFFLINE) forbids downloading them")
    listing = files.listing()
    pickled = _pickled(listing)
    if not pickled:
        safe = [f for f in listing if f.endswith(".safetensors")]
        if safe:
            raise ModelLoadError(f"{what}: no model.safetensors or {SAFETENSORS_INDEX} to read the "
                                 f"embeddings from (its safetensors files: {', '.join(safe[:3])})")
        raise _no_weights(what, listing)
    refuse_pickle(what, pickled, allow_pickle)
    for name in (PICKLE_INDEX, "pytorch_model.bin"):
        files.optional(name)
    return pickle_embedding(config_path.parent, config, what)


def _safetensors_embedding(files: _HubFiles, what: str, config: dict) -> Optional["torch.Tensor"]:
    """The table from the sharded index or the single ``model.safetensors``; None when the repository
    has neither."""
    index_path = files.optional(SAFETENSORS_INDEX)
    if index_path is not None:
        weight_map = read_json(index_path, what, error=ModelLoadError).get("weight_map") or {}
        return safetensors_embedding(weight_map, what, config, files.fetch)
    single = files.optional("model.safetensors")
    if single is None:
        return None
    names = {k: "model.safetensors" for k in safetensors_keys(single, what)}
    return safetensors_embedding(names, what, config, files.fetch)


# --------------------------------------------------------------------------- streaming from the hub
SNAPSHOT_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt")
"""The files a streamed run needs from a hub repository: config, index, safetensors shards, tokenizer."""


def hub_local_folder(repo: str, revision: Optional[str], cache_dir: Any) -> Optional[Path]:
    """The snapshot folder of ``repo`` in the local Hugging Face cache when its config is there
    (whether every shard is there is checked by whoever reads it), else None."""
    config = hub_cached_config(repo, revision, cache_dir)
    return config.parent if config is not None else None


def hub_download(repo: str, revision: Optional[str], cache_dir: Any) -> Path:
    """Download what streaming reads of ``repo`` (:data:`SNAPSHOT_PATTERNS`; never pickle weights) and
    return the snapshot folder."""
    from huggingface_hub import snapshot_download

    hub_files(repo, revision)  # a clear error, fast, when the hub cannot provide the repository
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=list(SNAPSHOT_PATTERNS)))
    except Exception as exc:
        raise ModelNotFoundError(f"{_what(repo)}: cannot download its safetensors shards: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def hub_tensors(repo: str, revision: Optional[str], cache_dir: Any) -> Optional[tuple[dict, dict]]:
    """(tensor name → :class:`~geoprobe.models.shards.TensorInfo`, raw config) of ``repo`` from the
    hub's safetensors metadata (the headers, fetched by range requests, no weights), or None when the
    hub cannot tell (offline mode, no safetensors); a repository the hub does not have (or cannot be
    reached for) raises :class:`ModelNotFoundError` (:func:`hub_files`)."""
    from .shards import TensorInfo

    if hub_offline():
        return None
    hub_files(repo, revision)  # a missing, gated or unreachable repository fails here, fast and clearly
    try:
        from huggingface_hub import get_safetensors_metadata, hf_hub_download

        meta = get_safetensors_metadata(repo, revision=revision)
        config = read_json(hf_hub_download(repo, "config.json", revision=revision, cache_dir=cache_dir),
                           _what(repo), error=ModelLoadError)
    except Exception as exc:  # the estimate is then skipped, the load itself says what is wrong
        logger.info("sizes of %s unknown before the download: %s", repo, exc)
        return None
    tensors = {name: TensorInfo(name=name, file=fname, shape=tuple(int(s) for s in t.shape), dtype=str(t.dtype))
               for fname, fm in meta.files_metadata.items() for name, t in fm.tensors.items()}
    return tensors, config
