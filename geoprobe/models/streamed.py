"""Hidden states of a checkpoint too large for the device, one decoder layer in memory at a time.

:class:`StreamedModel` stands where a :class:`~geoprobe.models.LoadedModel` stands for the probes
(``tokenizer``, ``info``, ``input_embeddings()``), but holds no weights. Its :meth:`~StreamedModel.layer_states`
pushes a set of padded batches through the network layer by layer and yields, after each layer, every
batch's states:

1. The base model class (``AutoModel`` of the config: ``LlamaModel``, ``Gemma3TextModel``,
   ``BertModel``, …) is built with empty weights (``accelerate.init_empty_weights``: parameters on the
   meta device, buffers such as the rotary frequencies real). Its small non-layer parameters (final
   norm; an encoder's position and type embeddings, layer norm and pooler) are read onto the device;
   the input-embedding table stays on the host.
2. Capture: each batch's input embeddings are looked up on the host (through the model's own embedding
   module, so Gemma's √d scale is applied) and moved to the device; the model's own ``forward`` then
   runs with every decoder layer replaced by a stand-in that records what the model hands it — the
   hidden states (layer 0's input, i.e. ``hidden_states[0]`` of ``output_hidden_states``), the
   attention mask (causal, sliding-window or padding, per layer type), the rotary position embeddings
   and position ids — and the last stand-in stops the pass. The model itself decides every argument,
   as ``LlamaModel.forward`` does when it calls ``decoder_layer(hidden_states, attention_mask=…,
   position_embeddings=…, position_ids=…)``.
3. Layer i: its tensors are read from the shards (``safe_open`` … ``get_tensor``, only that layer's;
   layer i + 1's are read by a second thread meanwhile), cast to the compute dtype on the device and
   assigned into layer i's module; every batch goes through it with the arguments recorded for layer
   i; the weights are dropped again.
4. Tail: the model's ``forward`` runs once more with stand-ins that hand back the last layer's output,
   so whatever the model applies after its layers (the final RMSNorm of a decoder, whose output
   transformers returns as the last hidden state) is applied by the model's own code.

Covered model types (:data:`STREAMED_MODEL_TYPES`): Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2 and
Gemma 3 (text) decoders, BERT and RoBERTa encoders; the tests check, for each, that the streamed
states equal ``output_hidden_states`` of the whole model. Other types are refused
(:func:`check_streamable`): their forward may do between layers what a stand-in would not see.

Memory: on the device, the largest layer plus the sample's activations (all batches, one layer's worth)
and the small non-layer parameters; on the host, the input-embedding table during the capture and two
layers' tensors as read (the one going to the device and the next).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from ..errors import ModelLoadError, StreamingError
from ..profile import ModelInfo
from ..records import read_json
from .common import checkpoint_mismatch, config_value, from_pretrained, tokenizer_from
from .safety import refuse_remote_code
from .shards import Checkpoint

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

STREAMED_MODEL_TYPES = {
    "llama": "decoder", "mistral": "decoder", "qwen2": "decoder", "qwen3": "decoder",
    "gemma": "decoder", "gemma2": "decoder", "gemma3_text": "decoder",
    "bert": "encoder", "roberta": "encoder",
}
"""The config ``model_type`` values streaming covers, and whether each is a decoder or an encoder."""


def covered_text() -> str:
    """The covered model types, for messages."""
    dec = [t for t, k in STREAMED_MODEL_TYPES.items() if k == "decoder"]
    enc = [t for t, k in STREAMED_MODEL_TYPES.items() if k == "encoder"]
    return f"{', '.join(dec)} decoders and {', '.join(enc)} encoders"


def check_streamable(config: dict, what: str) -> str:
    """The model type of raw config ``config`` when streaming covers it; :class:`StreamingError` naming
    the covered types otherwise."""
    model_type = str(config.get("model_type", ""))
    if model_type not in STREAMED_MODEL_TYPES:
        arch = ", ".join(config.get("architectures") or []) or "no architecture named"
        raise StreamingError(
            f"{what}: layer-by-layer streaming covers {covered_text()}, not model type {model_type!r} "
            f"({arch}); load it whole (leave out --stream) on a device with the memory for it")
    return model_type


class _Stop(Exception):
    """Ends the capture pass at the last layer's stand-in."""


@dataclass
class _Call:
    """What the model handed one layer: the positional arguments after the hidden states, and the
    keyword arguments."""

    args: tuple
    kwargs: dict


def _stand_ins(n: int, *, record: Optional[list] = None, replay: Any = None) -> Any:
    """``n`` modules that stand in for the layers: with ``record``, each appends (hidden states, call)
    and passes the states on, the last one raising :class:`_Stop`; with ``replay``, each passes the
    states on and the last one returns ``replay`` instead."""
    from torch import nn

    class StandIn(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.i = i

        def forward(self, hidden: Any, *args: Any, **kwargs: Any) -> Any:
            if record is not None:
                record.append((hidden, _Call(args, kwargs)))
                if self.i == n - 1:
                    raise _Stop
            elif self.i == n - 1:
                return replay
            return hidden

    return nn.ModuleList([StandIn(i) for i in range(n)])


def _meta_parameters(module: Any) -> None:
    """Drop ``module``'s parameter storage (every parameter becomes a meta tensor of its shape)."""
    import torch

    for m in module.modules():
        for key, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[key] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


class StreamedModel:
    """A checkpoint folder opened for layer-by-layer hidden states (see the module docstring).

    ``tokenizer``, ``name``, ``source``, ``info`` (:class:`~geoprobe.profile.ModelInfo`, ``dtype`` the
    compute dtype), ``config`` and ``device`` as a :class:`~geoprobe.models.LoadedModel` has them;
    ``checkpoint`` is the :class:`~geoprobe.models.shards.Checkpoint` read from."""

    streamed = True

    def __init__(self, folder: Path, *, device: Any, dtype: "torch.dtype", name: str, source: str,
                 trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoConfig

        folder = Path(folder)
        what = f"model folder {folder}"
        raw = read_json(folder / "config.json", what, error=ModelLoadError)
        refuse_remote_code(what, raw.get("auto_map"), trust_remote_code)
        model_type = check_streamable(raw, what)
        self.what, self.name, self.source = what, name, source
        self.device, self.dtype = torch.device(device), dtype
        self.checkpoint = Checkpoint.from_folder(folder, what)
        self.config = from_pretrained(AutoConfig, folder, what, trust_remote_code=False)
        self._shell = _empty_model(self.config, what)
        self.config = self._shell.config
        self._layers_name, self._layers = _layer_list(self._shell, self.n_layers, what)
        self._keys = _checkpoint_keys(self._shell, self.checkpoint, what)
        self._embedding = self._shell.get_input_embeddings()
        self._embedding_name = next(n for n, p in self._shell.named_parameters() if p is self._embedding.weight)
        self._materialise_rest()
        self.tokenizer = tokenizer_from(folder, what, trust_remote_code=False)
        emb = self.checkpoint.tensors[self._keys[self._embedding_name]]
        arch = (raw.get("architectures") or [type(self._shell).__name__])[0]
        self.info = ModelInfo(
            name=name, source=source, architecture=str(arch), model_type=model_type,
            n_parameters=self.checkpoint.n_parameters, vocab_size=int(emb.shape[0]),
            hidden_size=int(emb.shape[1]), n_layers=self.n_layers,
            dtype=str(dtype).removeprefix("torch."), is_encoder=STREAMED_MODEL_TYPES[model_type] == "encoder")

    # ------------------------------------------------------------------ what a LoadedModel has
    @property
    def n_layers(self) -> int:
        return int(config_value(self.config, "num_hidden_layers") or 0)

    def input_embeddings(self) -> "torch.Tensor":
        """The input-embedding table (vocab × hidden) as float32 on the CPU, read from its shard."""
        import torch

        key = self._keys[self._embedding_name]
        return self.checkpoint.read([key], dtype=torch.float32)[key]

    def layer_names(self, i: int) -> list[str]:
        """The checkpoint names of layer ``i``'s tensors."""
        prefix = f"{self._layers_name}.{i}."
        return [self._keys[prefix + n] for n, _ in self._layers[i].named_parameters()]

    def __repr__(self) -> str:
        return (f"StreamedModel({self.name}, {self.info.architecture}, {self.n_layers} layers, "
                f"{self.info.dtype} on {self.device})")

    # ------------------------------------------------------------------ streaming
    def layer_states(self, batches: Sequence[tuple["torch.Tensor", "torch.Tensor"]],
                     progress: Any = None) -> Iterator[tuple[int, list["torch.Tensor"]]]:
        """For padded ``batches`` of (input ids, attention mask), yield (0, states after the
        embeddings), then (i, states after layer i) for i = 1 … n_layers, the last one as the model
        returns it (after a decoder's final norm); each states list holds one (batch × width ×
        hidden) tensor per batch, on the device. ``progress`` (tqdm-like) advances once per layer."""
        import torch

        with torch.inference_mode():
            records = [self._capture(ids, mask) for ids, mask in self._with_table(batches)]
        states, calls = [h for h, _ in records], [c for _, c in records]
        del records
        yield 0, states
        # layer i + 1 is read from disk (a second thread) while layer i runs: two layers on the host at most
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="geoprobe-shards") as reader:
            pending = reader.submit(self._read_layer, 0)
            for i in range(self.n_layers):
                tensors = pending.result()
                if i + 1 < self.n_layers:
                    pending = reader.submit(self._read_layer, i + 1)
                layer = self._load_layer(i, tensors)
                del tensors
                with torch.inference_mode():
                    states = [self._run(layer, h, batch_calls[i]) for h, batch_calls in zip(states, calls)]
                    if i == self.n_layers - 1:
                        states = [self._tail(ids, h) for (ids, _), h in zip(batches, states)]
                _meta_parameters(layer)
                if progress is not None:
                    progress.update(1)
                yield i + 1, states

    def _with_table(self, batches: Sequence[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """``batches``, with the input-embedding table on the host while they are captured."""
        import torch

        key = self._keys[self._embedding_name]
        table = self.checkpoint.read([key], dtype=self.dtype)[key]
        self._embedding.load_state_dict({"weight": table}, assign=True)
        del table
        try:
            yield from batches
        finally:
            _meta_parameters(self._embedding)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _capture(self, ids: "torch.Tensor", mask: "torch.Tensor") -> tuple["torch.Tensor", list[_Call]]:
        """Layer 0's input and every layer's arguments for one batch (step 2)."""
        embeds = self._embedding(ids.cpu()).to(device=self.device, dtype=self.dtype)
        record: list = []
        self._swap(_stand_ins(self.n_layers, record=record))
        try:
            self._shell(inputs_embeds=embeds, attention_mask=mask.to(self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            self._swap(self._layers)
        if len(record) != self.n_layers:
            raise StreamingError(f"{self.what}: the model called {len(record)} of its {self.n_layers} layers; "
                                 "streaming cannot follow its forward pass")
        return record[0][0], [call for _, call in record]

    def _run(self, layer: Any, hidden: "torch.Tensor", call: _Call) -> "torch.Tensor":
        out = layer(hidden, *call.args, **call.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _tail(self, ids: "torch.Tensor", last: "torch.Tensor") -> "torch.Tensor":
        """The model's output for one batch whose last layer gave ``last`` (step 4)."""
        import torch

        zeros = torch.zeros_like(last)
        mask = torch.ones(ids.shape, dtype=torch.long, device=self.device)
        self._swap(_stand_ins(self.n_layers, replay=last))
        try:
            out = self._shell(inputs_embeds=zeros, attention_mask=mask, use_cache=False)
        finally:
            self._swap(self._layers)
        return out.last_hidden_state

    def _swap(self, modules: Any) -> None:
        parent, _, attr = self._layers_name.rpartition(".")
        setattr(self._shell.get_submodule(parent) if parent else self._shell, attr, modules)

    def _read_layer(self, i: int) -> dict[str, "torch.Tensor"]:
        """Layer ``i``'s tensors as stored (host memory, the checkpoint's dtype), by local name."""
        prefix = f"{self._layers_name}.{i}."
        local = [n for n, _ in self._layers[i].named_parameters()]
        read = self.checkpoint.read([self._keys[prefix + n] for n in local])
        return {n: read[self._keys[prefix + n]] for n in local}

    def _load_layer(self, i: int, tensors: dict[str, "torch.Tensor"]) -> Any:
        """Layer ``i`` with ``tensors`` (:meth:`_read_layer`) cast to the compute dtype on the device
        (step 3)."""
        layer = self._layers[i]
        on_device = {n: t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)
                     for n, t in tensors.items()}
        layer.load_state_dict(on_device, strict=False, assign=True)
        for m in layer.modules():
            for key, b in list(m._buffers.items()):
                if b is not None and b.device != self.device:
                    m._buffers[key] = b.to(self.device)
        return layer

    def _materialise_rest(self) -> None:
        """Read the non-layer parameters (but the input-embedding table) onto the device and move the
        buffers there (but the embedding module's, which stays on the host with its table)."""
        skip = self._layers_name + "."
        names = [n for n, _ in self._shell.named_parameters()
                 if not n.startswith(skip) and n != self._embedding_name]
        read = self.checkpoint.read([self._keys[n] for n in names], device=self.device, dtype=self.dtype)
        self._shell.load_state_dict({n: read[self._keys[n]] for n in names}, strict=False, assign=True)
        keep = {id(m) for m in self._embedding.modules()}
        for m in self._shell.modules():
            if id(m) in keep:
                continue
            for key, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[key] = b.to(self.device)
        self._shell.eval()


def _empty_model(config: Any, what: str) -> Any:
    """The base model of ``config`` with its parameters on the meta device and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModel

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModel.from_config(config)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{what}: cannot build the model from its config: {exc}") from None
    return model.eval()


def _layer_list(model: Any, n_layers: int, what: str) -> tuple[str, Any]:
    """(name, module list) of the model's ``n_layers`` blocks."""
    from torch import nn

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(found) != 1 or n_layers < 1:
        raise StreamingError(f"{what}: cannot tell which module holds the {n_layers} layers "
                             f"({len(found)} candidates); streaming does not cover this model")
    return found[0]


def _checkpoint_keys(model: Any, checkpoint: Checkpoint, what: str) -> dict[str, str]:
    """Model parameter name → checkpoint tensor name (the name itself or under the base-model prefix,
    ``model.layers.0…`` for ``layers.0…``), every shape checked against the checkpoint's headers.
    Missing or mis-shaped tensors raise :class:`ModelLoadError`, as loading the whole model does."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    keys: dict[str, str] = {}
    missing, mismatched = [], []
    for name, p in model.named_parameters():
        key = next((k for k in (name, f"{prefix}.{name}") if k in checkpoint.tensors), None)
        if key is None:
            missing.append(name)
        elif tuple(checkpoint.tensors[key].shape) != tuple(p.shape):
            mismatched.append(f"{key} {list(checkpoint.tensors[key].shape)} ≠ {list(p.shape)}")
        else:
            keys[name] = key
    if missing or mismatched:
        raise checkpoint_mismatch(what, missing, mismatched)
    return keys
