"""What every source shares once its files are found: the :class:`LoadedModel` record, the dtype
names, ``from_pretrained`` with its errors turned into geoprobe errors, the weight check (a checkpoint
that leaves tensors random is refused) and the finishing step that builds the
:class:`~geoprobe.profile.ModelInfo`."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from ..errors import GeoprobeError, ModelLoadError, UnsafeModelError
from ..profile import ModelInfo
from .causal import is_causal_lm
from .safety import is_pickle_weight, is_refused_pickle, remote_code_message, unsafe_pickle_error

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
    """The torch dtype named by ``dtype`` (``None`` → float32; "auto" passes through; the device's
    default is :func:`geoprobe.models.precision.resolve_dtype`)."""
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
    """``cls.from_pretrained`` with its errors turned into ModelLoadError/UnsafeModelError (pickle
    weights that torch's restricted unpickler refuses: :func:`~geoprobe.models.safety.unsafe_pickle_error`)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return cls.from_pretrained(where, **kwargs)
    except GeoprobeError:
        raise
    except Exception as exc:
        if is_refused_pickle(exc):
            raise unsafe_pickle_error(what, _pickle_name(where), exc) from None
        _raise_load_error(exc, what)


def _pickle_name(where: Union[str, Path]) -> str:
    """The pickle weight file(s) of a local folder, for messages (``the pickle weights`` elsewhere)."""
    folder = Path(where)
    names = sorted(p.name for p in folder.glob("*") if is_pickle_weight(p.name)) if folder.is_dir() else []
    return ", ".join(names[:3]) or "the pickle weights"


def _raise_load_error(exc: Exception, what: str) -> None:
    """Raise the geoprobe error for ``from_pretrained``'s failure ``exc``: UnsafeModelError where the
    checkpoint needs its own code, else ModelLoadError with the first line of the reason."""
    text = str(exc)
    if isinstance(exc, ValueError):
        if "trust_remote_code" in text:
            raise UnsafeModelError(remote_code_message(what, "needs custom code from the checkpoint")) from None
        raise ModelLoadError(f"cannot load {what}: {text.splitlines()[0] if text else repr(exc)}") from None
    if isinstance(exc, (OSError, RuntimeError, KeyError, TypeError, AttributeError, ImportError)):
        raise ModelLoadError(f"cannot load {what}: {type(exc).__name__}: {_first_line(exc)[:300]}") from None
    # safetensors raises its own SafetensorError
    raise ModelLoadError(f"cannot load {what}: the weights are corrupt or truncated ({type(exc).__name__}: "
                         f"{_first_line(exc)[:300]})") from None


def head_module_names(model: Any) -> list[str]:
    """Names of the task head of a model with one (the top-level modules holding parameters beside the
    base model named by ``base_model_prefix``): ``["classifier"]`` for ``BertForSequenceClassification``,
    ``["score"]`` for ``LlamaForSequenceClassification``; empty for a bare base model."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or getattr(model, prefix, None) is None:
        return []
    return [name for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())]


def is_sequence_classifier(model: Any) -> bool:
    """True for a transformers sequence-classification model (``…ForSequenceClassification``, or the
    class transformers maps a model type to for sequence classification); a PEFT model is judged by
    its base model."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        model = model.get_base_model()
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    except ImportError:
        return False
    return name in set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())


HEAD_SEED = 0
"""The torch seed a freshly initialised classification head is drawn with, so every load of one
checkpoint gives the same head whatever the global random state."""


def _init_head(model: Any, names: Sequence[str]) -> None:
    """Draw the head modules ``names`` afresh: every ``nn.Linear`` weight ~ N(0, σ²) with σ the config's
    ``initializer_range`` (0.02 when unset; BERT's initialisation, Devlin et al. 2019), biases 0, from a
    generator seeded with :data:`HEAD_SEED`."""
    import torch

    std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    gen = torch.Generator(device="cpu").manual_seed(HEAD_SEED)
    with torch.no_grad():
        for name in names:
            for module in getattr(model, name).modules():
                if isinstance(module, torch.nn.Linear):
                    w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                    module.weight.copy_(w)
                    if module.bias is not None:
                        module.bias.zero_()


def _model_class(config: Any, num_labels: Optional[int]) -> tuple[Any, bool]:
    """(auto class, causal) for ``config``: ``AutoModelForCausalLM`` for causal LMs, else
    ``AutoModelForSequenceClassification`` when ``num_labels`` is given, else ``AutoModel``."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    causal = is_causal_lm(config)
    if causal:
        return AutoModelForCausalLM, True
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ModelLoadError(f"a classification head needs num_labels ≥ 2 classes, got {num_labels!r}")
        config.num_labels = num_labels
        return AutoModelForSequenceClassification, False
    return AutoModel, False


_LOAD_LOGGERS = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")


@contextlib.contextmanager
def _quiet_load_report():
    """Hold back transformers' warnings while weights load: its load report (missing, unexpected and
    mis-shaped tensors, checked below: a fresh classification head is logged in one line, anything else
    missing is refused) and its tensor-parallel plan check (no model is sharded here)."""
    loggers = [logging.getLogger(name) for name in _LOAD_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_weights(config: Any, where: Union[str, Path], what: str, *, dtype: Any,
                 use_safetensors: Optional[bool], trust_remote_code: bool,
                 num_labels: Optional[int] = None, device: Optional[str] = None,
                 **hub_kwargs: Any) -> tuple[Any, bool]:
    """(model, causal): ``AutoModelForCausalLM`` when :func:`is_causal_lm` says so of ``config``;
    otherwise ``AutoModelForSequenceClassification`` with ``num_labels`` classes when ``num_labels`` is
    given (an encoder with a classification head), else ``AutoModel``. A checkpoint with missing or
    mis-shaped tensors (the model would be partly random) raises :class:`ModelLoadError`; the one
    exception is a classification head the checkpoint lacks (or holds for another number of classes),
    which is freshly initialised (:func:`_init_head`, seeded), as it is meant to be trained.

    On a CUDA ``device`` the weights go from the files straight to the GPU (``device_map``), so the
    host never holds the whole model."""
    cls, causal = _model_class(config, num_labels)
    head_kwargs = {"ignore_mismatched_sizes": True} if cls.__name__ == "AutoModelForSequenceClassification" else {}
    if device is not None and str(device).startswith("cuda"):
        head_kwargs["device_map"] = {"": str(device)}
    with _quiet_load_report():
        model, info = from_pretrained(
            cls, where, what, config=config, dtype=dtype, use_safetensors=use_safetensors,
            trust_remote_code=trust_remote_code, output_loading_info=True, **head_kwargs, **hub_kwargs)
    head = tuple(head_module_names(model)) if head_kwargs else ()

    def key_of(entry: Any) -> str:
        return str(entry[0] if isinstance(entry, (tuple, list)) else entry)

    def in_head(key: str) -> bool:
        return key.split(".", 1)[0] in head

    absent = [key_of(k) for k in info.get("missing_keys") or []] + \
        [key_of(m) for m in info.get("mismatched_keys") or []]
    fresh = sorted({k.split(".", 1)[0] for k in absent if in_head(k)})
    missing = sorted(k for k in (key_of(k) for k in info.get("missing_keys") or []) if not in_head(k))
    mismatched = sorted(key_of(m) for m in info.get("mismatched_keys") or [] if not in_head(key_of(m)))
    if missing or mismatched:
        raise checkpoint_mismatch(what, missing, mismatched)
    if fresh:
        _init_head(model, fresh)
        logger.info("%s: classification head %s with %d classes, freshly initialised (seed %d)",
                    what, ", ".join(fresh), num_labels, HEAD_SEED)
    unexpected = info.get("unexpected_keys") or []
    if unexpected:
        logger.info("%s: %d checkpoint tensors not used by %s", what, len(unexpected), cls.__name__)
    return model, causal


def checkpoint_mismatch(what: str, missing: Sequence[str], mismatched: Sequence[str]) -> ModelLoadError:
    """The error for weights that do not fill the model their config builds: how many tensors are
    missing and how many have another shape, with the first five named."""
    bad = (list(missing) + list(mismatched))[:5]
    return ModelLoadError(
        f"{what}: the checkpoint does not match its config ({len(missing)} missing, {len(mismatched)} "
        f"mis-shaped tensors, e.g. {', '.join(bad)}); the model would be partly random. Check that "
        "config.json belongs to these weights.")


def tokenizer_from(where: Union[str, Path], what: str, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(where, **kwargs)`` with geoprobe errors."""
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, where, f"the tokenizer of {what}", **kwargs)


def check_device(device: Any) -> str:
    """``device`` as a string after checking that this machine has it (cheap: nothing is loaded).

    Raises:
        ModelLoadError: a name torch does not know, CUDA (or another accelerator) absent, or a GPU
            index beyond the GPUs present; the message names ``--device`` and what to use instead.
    """
    import torch

    text = str(device)
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"--device {text}: not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ModelLoadError(f"--device {text}: CUDA is not available here ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ModelLoadError(f"--device {text}: this machine has {count} GPU{'s' if count != 1 else ''} "
                                 f"(cuda:0 … cuda:{count - 1}); choose one of them")
        return text
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if dev.type in ("meta",) or not callable(available) or not available():
        raise ModelLoadError(f"--device {text}: {dev.type} is not available here; use cpu or cuda")
    return text


def to_device(lm: LoadedModel, device: str) -> LoadedModel:
    """``lm`` with its model moved to ``device`` (a clear error when it cannot be)."""
    try:
        model = lm.model.to(_torch_device(device))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ModelLoadError(f"cannot move the model to device {device!r}: {_first_line(exc)[:300]}") from None
    return dataclasses.replace(lm, model=model)


def _torch_device(device: str) -> Any:
    import torch

    return torch.device(device)


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


WARM_UP_TOKENS = 16
"""Tokens of the one forward pass :func:`warm_up` runs."""


def warm_up(lm: LoadedModel) -> None:
    """One forward pass of :data:`WARM_UP_TOKENS` tokens, without gradients, on a model just loaded on
    the CPU, so that the first pass a measurement makes rounds as every later pass does.

    On a multi-threaded CPU the first forward pass after loading has been seen to round differently from
    all later ones: SmolLM2-135M, torch 2.13, 2 threads, the same 8 documents twice right after
    loading: the rotary embedding's cosine differed by 1.5e-4 in one element and the hidden states by
    up to 0.12, in about one process in three; on one thread, or after one short pass, repeated passes
    agreed bit for bit in every process tried (30 of 30). Without this, a probe's
    numbers depended on whether the process had run the model before."""
    import torch

    vocab = int(lm.model.get_input_embeddings().weight.shape[0])
    ids = torch.arange(WARM_UP_TOKENS, dtype=torch.long)[None] % vocab
    device = next(lm.model.parameters()).device
    with torch.no_grad():
        lm.model(input_ids=ids.to(device))

