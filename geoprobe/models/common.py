"""What every source shares once its files are found: the :class:`LoadedModel` record, the dtype
names, ``from_pretrained`` with its errors turned into geoprobe errors, the weight check (a checkpoint
that leaves tensors random is refused) and the finishing step that builds the
:class:`~geoprobe.profile.ModelInfo`."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from ..errors import GeoprobeError, ModelLoadError, UnsafeModelError
from ..profile import ModelInfo
from .causal import is_causal_lm
from .safety import remote_code_message

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DtypeLike = Union[None, str, "torch.dtype"]


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


def torch_dtype(dtype: DtypeLike) -> Any:
    """The torch dtype named by ``dtype`` (``None`` → float32; "auto" passes through)."""
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


def config_value(config: Any, *names: str) -> Optional[int]:
    """The first integer attribute among ``names``, looked up in the text config first (multimodal
    configs nest it) and then in ``config``."""
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


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def from_pretrained(cls: Any, where: Union[str, Path], what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with its errors turned into ModelLoadError/UnsafeModelError."""
    try:
        return cls.from_pretrained(where, **kwargs)
    except GeoprobeError:
        raise
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise UnsafeModelError(
                remote_code_message(what, "needs custom code from the checkpoint")) from None
        raise ModelLoadError(f"cannot load {what}: {text.splitlines()[0] if text else exc!r}") from None
    except (OSError, RuntimeError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise ModelLoadError(f"cannot load {what}: {type(exc).__name__}: {_first_line(exc)}") from None
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ModelLoadError(
            f"cannot load {what}: the weights are corrupt or truncated ({type(exc).__name__}: "
            f"{_first_line(exc)})") from None


def load_weights(config: Any, where: Union[str, Path], what: str, *, dtype: Any,
                 use_safetensors: Optional[bool], trust_remote_code: bool,
                 **hub_kwargs: Any) -> tuple[Any, bool]:
    """(model, causal): ``AutoModelForCausalLM`` when :func:`is_causal_lm` says so of ``config``,
    else ``AutoModel``. A checkpoint with missing or mis-shaped tensors (the model would be partly
    random) raises :class:`ModelLoadError`."""
    from transformers import AutoModel, AutoModelForCausalLM

    causal = is_causal_lm(config)
    cls = AutoModelForCausalLM if causal else AutoModel
    model, info = from_pretrained(
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


def tokenizer_from(where: Union[str, Path], what: str, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(where, **kwargs)`` with geoprobe errors."""
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, where, f"the tokenizer of {what}", **kwargs)


def finish(model: Any, tokenizer: Any, *, name: str, source: str, device: str, dtype: Any,
           causal: bool) -> LoadedModel:
    """Cast and move ``model``, switch it to eval mode and record its :class:`ModelInfo`."""
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
    n_layers = config_value(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers") or 0
    info = ModelInfo(
        name=name, source=source, architecture=str(config.architectures[0]),
        model_type=str(getattr(config, "model_type", "")),
        n_parameters=int(sum(p.numel() for p in model.parameters())),
        vocab_size=int(emb.shape[0]), hidden_size=int(emb.shape[1]), n_layers=int(n_layers),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        is_encoder=not causal and not bool(getattr(config, "is_encoder_decoder", False)))
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, info=info)
