"""GeLoRA: per-layer LoRA ranks from the intrinsic dimension of hidden states.

GeLoRA (Ed-dib et al., "GeLoRA: Geometric Adaptive Ranks for Efficient LoRA Fine-tuning",
arXiv 2412.09250). The package, one idea per module:

* :mod:`.functional`: the rank rules (:func:`gelora_ranks`, ``diff``/``max``/``budget``; :data:`RULES`);
* :mod:`.layers`: the model side (:func:`target_layers`, :func:`params_per_rank`,
  :func:`lora_parameter_count`);
* :mod:`.config`: :func:`gelora_config`, per-block ranks as a stock PEFT ``LoraConfig`` (``rank_pattern``,
  ``alpha_pattern``, rank-0 blocks in ``exclude_modules``).
"""
from .config import gelora_config
from .functional import RULES, gelora_ranks
from .layers import lora_parameter_count, params_per_rank, target_layers

__all__ = [
    "RULES",
    "gelora_ranks",
    "gelora_config",
    "target_layers",
    "params_per_rank",
    "lora_parameter_count",
]
