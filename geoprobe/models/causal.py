"""The one answer to "is this a causal language model?" (a decoder that predicts the next token, so it
can be fine-tuned on answers and generate them), for a config, a model, a PEFT model or a loaded
model."""
from __future__ import annotations

from typing import Any

CAUSAL_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(obj: Any) -> bool:
    """True when ``obj`` is, or describes, a causal language model.

    ``obj`` may be:

    * a :class:`~geoprobe.models.LoadedModel`: the loader's own decision (it built the model with
      ``AutoModelForCausalLM`` exactly when this function said so of the config), i.e. neither an
      encoder nor an encoder-decoder;
    * a PEFT model: its base model is judged;
    * a model (anything with a ``config`` that is not itself a config): its class decides, since the
      model in hand is what runs. It is causal when the class name ends in ``ForCausalLM`` or
      ``LMHeadModel``, is one of the classes transformers maps a model type to for causal LM
      (``ReformerModelWithLMHead``, ``Gemma3ForConditionalGeneration``, …), or is the class the
      checkpoint's own code registers for ``AutoModelForCausalLM`` (``auto_map``). A model without its
      LM head (``LlamaModel``) is not, whatever its config names;
    * a transformers config: never an encoder-decoder (``is_encoder_decoder``: T5, BART); with
      ``architectures``, causal when one of them is a causal class by the rule above; without, when
      its ``model_type`` has a causal-LM class in transformers and either has no masked-LM class or
      the config sets ``is_decoder`` (BERT configured as a decoder).
    """
    if _is_loaded_model(obj):
        config = getattr(obj.model, "config", None)
        return not obj.info.is_encoder and not getattr(config, "is_encoder_decoder", False)
    if hasattr(obj, "get_base_model") and callable(obj.get_base_model):
        obj = obj.get_base_model()
    config = getattr(obj, "config", None)
    if config is not None and not _is_config(obj):
        return _causal_class(type(obj).__name__, config)
    return _causal_config(obj)


def _is_loaded_model(obj: Any) -> bool:
    """A :class:`~geoprobe.models.LoadedModel` (recognised by its fields, so this module need not import
    the loader that calls it)."""
    return hasattr(obj, "info") and hasattr(obj.info, "is_encoder") and hasattr(obj, "model")


def _is_config(obj: Any) -> bool:
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return False
    return isinstance(obj, PretrainedConfig)


def _causal_class_names() -> frozenset[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return frozenset()
    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _causal_class(name: str, config: Any) -> bool:
    if name.endswith(CAUSAL_CLASS_SUFFIXES) or name in _causal_class_names():
        return True
    auto_map = getattr(config, "auto_map", None)
    registered = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    if isinstance(registered, (list, tuple)):
        registered = registered[0] if registered else None
    return isinstance(registered, str) and registered.rsplit(".", 1)[-1] == name


def _causal_config(config: Any) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        return False
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        return any(_causal_class(str(a), config) for a in archs)
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    model_type = getattr(config, "model_type", "")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    return model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(getattr(config, "is_decoder", False))
