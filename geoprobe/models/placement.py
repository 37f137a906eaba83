"""How a model is opened for probing: whole on the device, streamed one layer at a time, or its input
embeddings alone — decided, with an estimate of memory and time, before anything is loaded.

:func:`plan_load` reads only headers and configs (:mod:`geoprobe.models.footprint`) and returns a
:class:`LoadPlan`; :func:`load_planned` opens what it says. The decision:

* ``embeddings_only``: the input-embedding table alone (:mod:`geoprobe.models.embedding_model`);
* ``stream=True`` (``--stream``): streamed (:mod:`geoprobe.models.streamed`), refused for a model type it
  does not cover, for GGUF files and pickle weights;
* ``stream=None``: the whole model when its estimate fits the budgets given (``max_gpu_memory``,
  ``max_memory``) and the memory free now; else streamed when that fits, with a log line saying why;
* ``stream=False``: the whole model.

A budget the chosen way cannot meet is refused with the numbers (for a streamed run: what one layer
and the sample's activations need). The free memory alone only steers the choice: estimates are
approximate, so a run over the free memory but within every budget given is logged, not refused.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import GeoprobeError, MemoryBudgetError, ModelLoadError, StreamingError
from ..records import Record, read_json
from ..runtime import cuda_free_bytes, host_available_bytes
from .footprint import Estimate, Footprint, ceil_gib, estimate, gib, matmul_rate, sample_tokens
from .common import torch_dtype
from .precision import check_device, checkpoint_dtype, dtype_name, resolve_dtype
from .safety import weight_files
from .shards import Checkpoint
from .spec import DEFAULT_NAME, Spec, folder_name, resolve_spec
from .streamed import STREAMED_MODEL_TYPES, check_streamable, covered_text

logger = logging.getLogger(__name__)

MODES = ("whole", "streamed", "embeddings")


@dataclass(frozen=True)
class LoadPlan(Record):
    """What :func:`plan_load` decided: the model (``spec`` as given, ``kind`` of source, ``name``),
    the ``mode`` ("whole", "streamed", "embeddings") and why (``reason``), ``device`` and ``dtype``, the
    local ``folder`` streaming reads (None until a hub download), the ``estimate`` of the chosen mode
    and the ``other`` mode's when both were weighed (None where the sizes are unknown: GGUF, pickle
    weights, a hub model the hub cannot describe)."""

    spec: Optional[str]
    kind: str
    name: str
    mode: str
    reason: str
    device: str
    dtype: str
    folder: Optional[str] = None
    estimate: Optional[Estimate] = None
    other: Optional[Estimate] = None

    def lines(self) -> list[str]:
        """What a person reads before the load: the choice and its reason, then the estimate."""
        how = {"whole": "whole", "streamed": "streamed, one layer at a time",
               "embeddings": "input embeddings only"}[self.mode]
        out = [f"{self.name}: {how} ({self.reason})"]
        if self.estimate is not None:
            out.append(f"estimate: {self.estimate.describe()}")
        else:
            out.append("estimate: none (the checkpoint's sizes are not known before it is read)")
        return out


@dataclass(frozen=True)
class _Source:
    """What the headers told: raw config, footprint (None when unknown), the weights' dtype, the local
    folder and whether its weights are safetensors."""

    config: dict
    footprint: Optional[Footprint]
    weights_dtype: Optional[str]
    folder: Optional[Path]
    safetensors: bool


def _source(kind: str, target: Any, *, cache_dir: Any, revision: Optional[str]) -> _Source:
    from .hub import hub_local_folder, hub_tensors

    if kind in ("default", "gguf"):
        from .gguf import cached_copy

        cached = cached_copy(Path(target))  # the dequantised copy: sizes without reading the GGUF
        src = _local(cached) if cached is not None else None
        fp = src.footprint if src is not None else None
        return _Source(src.config if src else {}, fp, "float32", None, False)
    if kind == "folder":
        return _local(Path(target))
    local = hub_local_folder(str(target), revision, cache_dir)
    if local is not None:
        try:
            return _local(local)
        except ModelLoadError as exc:  # an incomplete copy in the cache: the hub has the rest
            logger.info("local copy of %s incomplete (%s)", target, exc)
    found = hub_tensors(str(target), revision, cache_dir)
    if found is None:
        return _Source({}, None, None, None, True)
    tensors, config = found
    from .shards import FLOAT_DTYPES

    by: dict[str, int] = {}
    for t in tensors.values():
        by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
    floats = [d for d in sorted(by, key=by.__getitem__, reverse=True) if d in FLOAT_DTYPES]
    return _Source(config, _footprint(tensors, config), FLOAT_DTYPES[floats[0]] if floats else None, None, True)


def _local(folder: Path) -> _Source:
    what = f"model folder {folder}"
    config = read_json(folder / "config.json", what, error=ModelLoadError)
    safe, _ = weight_files(folder)
    if not safe:
        return _Source(config, None, None, folder, False)
    ckpt = Checkpoint.from_folder(folder, what)
    return _Source(config, _footprint(ckpt.tensors, config), ckpt.float_dtype(), folder, True)


def _footprint(tensors: Any, config: dict) -> Optional[Footprint]:
    try:
        return Footprint.from_tensors(tensors, config)
    except GeoprobeError as exc:
        logger.info("no size estimate: %s", exc)
        return None


def _name(kind: str, target: Any) -> str:
    if kind == "default":
        return DEFAULT_NAME
    if kind == "gguf":
        return Path(target).stem
    return folder_name(Path(target)) if kind == "folder" else str(target)


def plan_load(spec: Spec = None, *, device: str = "cpu", dtype: Any = None, stream: Optional[bool] = None,
              embeddings_only: bool = False, max_gpu_memory: Optional[int] = None,
              max_memory: Optional[int] = None, positions: int = 1200, documents: int = 8,
              max_length: int = 128, batch_size: int = 8, cache_dir: Any = None,
              revision: Optional[str] = None) -> LoadPlan:
    """Decide how to open ``spec`` for probing (module docstring) from headers and configs alone.

    ``positions``, ``documents``, ``max_length`` and ``batch_size`` describe the hidden-state sample
    (``ProbeSettings.layer_positions``, ``layer_sets``, ``max_length``, ``batch_size``); budgets are in
    bytes. Raises :class:`StreamingError` (``--stream`` on what it does not cover),
    :class:`MemoryBudgetError` (a budget that cannot be met), :class:`~geoprobe.errors.DeviceError`
    (no such device, a dtype it cannot compute in) and the loaders' errors for missing or corrupt files.
    """
    kind, target = resolve_spec(spec)
    name = _name(kind, target)
    spec_text = None if spec is None else os.fspath(spec)
    if embeddings_only:
        if stream:
            raise GeoprobeError("--stream reads hidden states and --embeddings-only reads none; give one of them")
        try:
            src = _source(kind, target, cache_dir=cache_dir, revision=revision)
        except ModelLoadError as exc:  # shards the table is not in may be absent: it is read alone
            logger.info("no size estimate: %s", exc)
            src = _Source({}, None, None, None, True)
        est = None if src.footprint is None else estimate(
            src.footprint, mode="embeddings", device="cpu", dtype=_torch_float32(), tokens=0, positions=0,
            batch_size=1, max_length=1)
        if est is not None and max_memory is not None and est.host_bytes > max_memory:
            raise MemoryBudgetError(f"--max-memory {gib(max_memory)} cannot hold the input-embedding table of "
                                    f"{name}: it needs about {gib(est.host_bytes)} (raise it to "
                                    f"{ceil_gib(est.host_bytes)})")
        return LoadPlan(spec=spec_text, kind=kind, name=name, mode="embeddings", reason="asked for",
                        device="cpu", dtype="float32", folder=_str(src.folder), estimate=est)
    dev = check_device(device)
    if stream and kind in ("default", "gguf"):
        raise StreamingError(f"--stream reads safetensors shards; {target} is a GGUF file, which is "
                             "dequantised and loaded whole (leave out --stream)")
    src = _source(kind, target, cache_dir=cache_dir, revision=revision)
    chosen_dtype = resolve_dtype(dtype, dev, checkpoint_dtype(src.config, src.weights_dtype))
    streamable = src.safetensors and str(src.config.get("model_type", "")) in STREAMED_MODEL_TYPES
    if stream:
        if not src.safetensors:
            raise StreamingError(f"--stream reads safetensors shards; {name} has only pickle weights")
        if src.config:
            check_streamable(src.config, name)
    common = dict(spec=spec_text, kind=kind, name=name, device=str(dev), dtype=dtype_name(chosen_dtype),
                  folder=_str(src.folder))
    if src.footprint is None:
        why = "--stream" if stream else "sizes unknown before the load"
        if max_gpu_memory is not None or max_memory is not None:
            logger.warning("the memory budget cannot be checked before %s is read: its sizes are unknown", name)
        return LoadPlan(mode="streamed" if stream else "whole", reason=why, **common)
    sample = dict(tokens=sample_tokens(positions, documents, max_length), positions=positions,
                  batch_size=batch_size, max_length=max_length,
                  flops_per_second=matmul_rate(dev, chosen_dtype))
    whole = estimate(src.footprint, mode="whole", device=dev, dtype=chosen_dtype, **sample)
    streamed = estimate(src.footprint, mode="streamed", device=dev, dtype=chosen_dtype, **sample) if streamable else None
    budgets = _Budgets(dev, max_gpu_memory, max_memory)
    if stream:
        budgets.refuse(streamed, name, src.footprint, chosen_dtype)
        return LoadPlan(mode="streamed", reason="--stream", estimate=streamed, other=whole, **common)
    auto = stream is None
    if budgets.fits(whole, free=auto):
        return LoadPlan(mode="whole", reason="it fits" if auto else "streaming off", estimate=whole,
                        other=streamed, **common)
    if auto and streamed is not None and budgets.fits(streamed):
        reason = f"the whole model needs {budgets.shortfall(whole)}; streaming needs {gib(budgets.need(streamed))}"
        logger.warning("%s does not fit: %s. Reading its hidden states one layer at a time", name, reason)
        return LoadPlan(mode="streamed", reason=reason, estimate=streamed, other=whole, **common)
    if budgets.fits(whole):  # short of the free memory only: the estimate may be pessimistic
        logger.warning("%s may not fit: it needs %s", name, budgets.shortfall(whole))
        return LoadPlan(mode="whole", reason="within the budgets given", estimate=whole, other=streamed, **common)
    if auto and streamed is not None:
        budgets.refuse(streamed, name, src.footprint, chosen_dtype)
    covered = "" if streamed is not None or not auto else (
        f", and layer-by-layer streaming covers {covered_text()}, not "
        f"{str(src.config.get('model_type', 'this model'))!r}" + ("" if src.safetensors else " with pickle weights"))
    raise MemoryBudgetError(f"{name} needs {budgets.shortfall(whole)} to load whole{covered}")


def _str(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)


def _torch_float32() -> Any:
    import torch

    return torch.float32


class _Budgets:
    """The budgets given and the memory free now, on the device and on the host."""

    def __init__(self, dev: Any, max_gpu: Optional[int], max_host: Optional[int]) -> None:
        self.cuda = dev.type == "cuda"
        self.max_gpu = max_gpu if self.cuda else None
        self.max_host = max_host
        self.free_gpu = cuda_free_bytes(dev) if self.cuda else None
        self.free_host = host_available_bytes()
        if max_gpu is not None and not self.cuda:
            logger.warning("--max-gpu-memory has no effect on %s; --max-memory bounds the host", dev)

    @staticmethod
    def _within(need: int, *limits: Optional[int]) -> bool:
        return all(need <= lim for lim in limits if lim is not None)

    def fits(self, e: Optional[Estimate], free: bool = False) -> bool:
        """Whether ``e`` fits the budgets given (and, with ``free``, the memory free now)."""
        if e is None:
            return False
        gpu_ok = self._within(e.gpu_bytes, self.max_gpu, self.free_gpu if free else None) if self.cuda else True
        return gpu_ok and self._within(e.host_bytes, self.max_host, self.free_host if free else None)

    def need(self, e: Estimate) -> int:
        return e.gpu_bytes if self.cuda else e.host_bytes

    def shortfall(self, e: Estimate) -> str:
        """What ``e`` needs against the tightest limit it breaks, in words."""
        parts = []
        if self.cuda:
            for what, lim in (("--max-gpu-memory", self.max_gpu), ("free on the GPU", self.free_gpu)):
                if lim is not None and e.gpu_bytes > lim:
                    parts.append(f"{gib(e.gpu_bytes)} on the GPU ({what}: {gib(lim)})")
                    break
        for what, lim in (("--max-memory", self.max_host), ("available", self.free_host)):
            if lim is not None and e.host_bytes > lim:
                parts.append(f"{gib(e.host_bytes)} of host memory ({what}: {gib(lim)})")
                break
        return " and ".join(parts) or f"{gib(self.need(e))}"

    def refuse(self, e: Optional[Estimate], name: str, fp: Footprint, dtype: Any) -> None:
        """Raise :class:`MemoryBudgetError` when streamed estimate ``e`` breaks a budget given."""
        if e is None or self.fits(e):
            return
        import torch

        s = torch.empty((), dtype=dtype).element_size()
        weights = fp.layer_parameters * s
        if self.cuda and self.max_gpu is not None and e.gpu_bytes > self.max_gpu:
            raise MemoryBudgetError(
                f"--max-gpu-memory {gib(self.max_gpu)} cannot hold one streamed layer of {name}: its largest "
                f"layer takes {gib(weights)} in {dtype_name(dtype)} and the sample's activations "
                f"{gib(e.layer_bytes - weights)} ({gib(e.gpu_bytes)} on the GPU with the non-layer "
                f"parameters); give at least {ceil_gib(e.gpu_bytes)}, or lower --layer-positions or "
                "--batch-size")
        layer = "" if self.cuda else f"one layer with the sample's activations {gib(e.layer_bytes)}, "
        raise MemoryBudgetError(
            f"--max-memory {gib(self.max_host or 0)} cannot hold a streamed run of {name}: it needs about "
            f"{gib(e.host_bytes)} of host memory ({layer}two layers as read from disk {gib(2 * fp.layer_file_bytes)}, "
            f"the input-embedding table {gib(fp.embedding_parameters * 4)} as float32, the sampled "
            f"states and the libraries); give at least {ceil_gib(e.host_bytes)}")


def load_planned(plan: LoadPlan, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                 cache_dir: Union[str, os.PathLike, None] = None, revision: Optional[str] = None) -> Any:
    """Open what ``plan`` says: a :class:`~geoprobe.models.LoadedModel` (whole), a
    :class:`~geoprobe.models.streamed.StreamedModel` (streamed) or an
    :class:`~geoprobe.models.embedding_model.EmbeddingModel` (embeddings)."""
    from . import embedding_model, load_embeddings, load_model, load_tokenizer
    from .gguf import cached_copy
    from .hub import hub_download
    from .streamed import StreamedModel

    kind, target = resolve_spec(plan.spec)
    if plan.mode == "whole":
        return load_model(plan.spec, device=plan.device, dtype=plan.dtype, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code, cache_dir=cache_dir, revision=revision)
    if plan.mode == "streamed":
        folder = Path(plan.folder) if plan.folder else hub_download(str(target), revision, cache_dir)
        source = "hub" if kind == "hub" else "folder"
        return StreamedModel(folder, device=plan.device, dtype=torch_dtype(plan.dtype),
                             name=plan.name, source=source, trust_remote_code=trust_remote_code)
    if plan.mode != "embeddings":
        raise ValueError(f"unknown mode {plan.mode!r}")
    table = load_embeddings(plan.spec, allow_pickle=allow_pickle, cache_dir=cache_dir, revision=revision)
    tokenizer = load_tokenizer(plan.spec, trust_remote_code=trust_remote_code, cache_dir=cache_dir,
                               revision=revision)
    if kind in ("default", "gguf"):
        cached = cached_copy(Path(target))
        if cached is not None:
            return embedding_model.open_folder(cached, table, tokenizer, name=plan.name, source=kind)
        return embedding_model.open_gguf(Path(target), table, tokenizer, name=plan.name, source=kind)
    if kind == "folder":
        return embedding_model.open_folder(Path(target), table, tokenizer, name=plan.name, source="folder")
    return embedding_model.open_hub(str(target), table, tokenizer, revision=revision, cache_dir=cache_dir)
