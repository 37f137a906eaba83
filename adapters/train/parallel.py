"""Fine-tuning on several processes through Hugging Face Accelerate: the processes of one run
(:class:`Group`), how a global batch is shared among them, and the whole adapter and optimizer state
gathered for checkpoints.

Start. The processes are started by Accelerate's launcher (``accelerate launch``, which ``geoprobe
finetune --num-processes N`` calls, see :mod:`.launch`) or by ``torchrun``; :func:`join` creates the
``accelerate.Accelerator``, which sets up the process group (NCCL on GPUs, gloo on the CPU) and gives
each process its device (``cuda:LOCAL_RANK``). One process is :func:`single`, with the same interface.

How the global batch is split. The settings describe a step exactly as in one process: G =
``grad_accum`` micro-batches of B = ``batch_size`` sequences, in the order of :mod:`.order`. With P
processes every micro-batch is cut into P contiguous runs of ⌈B/P⌉ or ⌊B/P⌋ sequences (the first
B mod P processes take one more, :meth:`Group.rows`); process p computes its run of each micro-batch.
Every process counts the answer tokens N of the whole step on the host (the same labels, no
communication) and back-propagates

    L_p = P · Σ_{answer tokens of its runs} −log p(x_t | x_<t) / N,

so the average of the P gradients that DDP (all-reduce) and FSDP (reduce-scatter) form is exactly the
gradient of the one-process objective Σ_{all answer tokens} −log p / N. A process whose run is empty
(B < P, or the short last micro-batch of an epoch) runs one sequence of the micro-batch with weight 0,
so that every process takes part in every collective. The recorded loss is Σ_p Σ −log p / N (one
all-reduce when the losses are read).

Strategies.

* ``ddp`` — every process holds the whole model on its device; Accelerate's DDP wrapper
  (``Accelerator.prepare_model``) all-reduces the adapter gradients, once per step (the micro-batches
  before the last run under ``no_sync``).
* ``fsdp`` — FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per decoder layer (the classes
  the model names in ``_no_split_modules``, the units Accelerate's transformer wrap policy forms) and
  the root; parameters, gradients and optimizer states are sharded over the processes and a layer's
  weights are gathered for its forward and backward only, so a model that does not fit one GPU
  trains on several. Frozen base weights and trainable adapter weights share a unit (FSDP2 asks for
  one dtype among the trainable parameters only). FSDP shards along the first dimension and refuses
  0-dim parameters, which is why HypLoRA's curvature and scale have shape (1,). Accelerate's FSDP
  plugin serves CUDA devices only; geoprobe applies ``fully_shard`` itself, so the one code path runs
  on GPUs and in the CPU (gloo) test.

What differs from one process: rounding (each micro-batch is computed in smaller pieces); dropout
masks (process p > 0 draws from its own generator, seeded from (seed, p), so a run with dropout > 0
agrees with the one-process run in distribution, and with dropout 0 up to rounding); HydraLoRA's
load-balancing loss, computed by each process on its sequences and averaged, as data-parallel
Switch-Transformer training does.

Checkpoints. The main process writes the adapter and the optimizer state whole (FSDP shards gathered
first), in the format of a one-process run, and the RNG state of every process beside them. A run
therefore resumes on any number of processes (the data order does not depend on it); the per-process
RNG states are restored when the number is the same.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np

from geoprobe.backends.spread import share
from geoprobe.errors import DeviceError

log = logging.getLogger(__name__)

__all__ = ["STRATEGIES", "Group", "single", "join", "launched_processes", "share", "check_strategy"]

STRATEGIES = ("ddp", "fsdp")
"""How the processes share the model: replicated (DDP) or sharded (FSDP2)."""


def launched_processes() -> Optional[int]:
    """The number of processes of the run this process belongs to (``WORLD_SIZE``, set by
    ``accelerate launch`` and ``torchrun``, also for a single process); None when it was started
    alone."""
    try:
        return max(1, int(os.environ["WORLD_SIZE"]))
    except (KeyError, ValueError):
        return None


def check_strategy(strategy: str) -> str:
    """``strategy`` if it is one of :data:`STRATEGIES`; a :class:`DeviceError` naming them otherwise."""
    if strategy not in STRATEGIES:
        raise DeviceError(f"--parallel {strategy!r} is not one of {', '.join(STRATEGIES)}")
    return strategy


class Group:
    """The processes of one fine-tune run as this process sees them (see the module docstring).

    ``strategy`` is ``single`` (one process), ``ddp`` or ``fsdp``; ``device`` is this process's
    device; ``accelerator`` the ``accelerate.Accelerator`` of a run of several processes.
    """

    def __init__(self, strategy: str, device: Any, accelerator: Any = None) -> None:
        self.strategy, self.device, self.accelerator = strategy, device, accelerator
        self.world = int(accelerator.num_processes) if accelerator is not None else 1
        self.rank = int(accelerator.process_index) if accelerator is not None else 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP shards (a launched run with the ``fsdp`` strategy)."""
        return self.strategy == "fsdp" and self.accelerator is not None

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes files (rank 0)."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What the results record of the run: the number of processes and the strategy."""
        return {"processes": self.world, "parallel": self.strategy}

    def rows(self, n: int) -> slice:
        """This process's rows of a micro-batch of ``n`` sequences (:func:`share`)."""
        return share(n, self.world, self.rank)

    # ---------------------------------------------------------------- the model
    def wrap(self, model: Any) -> Any:
        """The model the forward passes go through: ``model`` itself in one process, Accelerate's DDP
        wrapper around it, or ``model`` sharded in place by FSDP2 (module docstring)."""
        if self.accelerator is None:
            return model
        if self.sharded:
            return _shard(model, self.device, self.world)
        return self.accelerator.prepare_model(model)

    def no_sync(self, wrapped: Any, sync: bool) -> Any:
        """A context in which DDP accumulates gradients without all-reducing them (``sync`` False);
        a no-op for one process and FSDP."""
        if sync or self.strategy != "ddp" or not self.distributed:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(wrapped)

    def seed_dropout(self, seed: int) -> None:
        """Give process p > 0 its own torch generators, seeded from (seed, p), for the dropout masks;
        process 0 continues the one-process stream."""
        if self.rank == 0:
            return
        import torch

        torch.manual_seed(int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0]))

    # ---------------------------------------------------------------- collectives
    def sum_(self, tensor: Any) -> Any:
        """``tensor`` summed over the processes, in place (on this process's device)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait until every process has arrived."""
        if self.distributed:
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """End the run's communication: wait for every process, then destroy the process group (an exit
        with the group alive can abort a process whose peers have already gone)."""
        if self.accelerator is not None:
            self.barrier()
            self.accelerator.end_training()

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order (pickled; for small objects only)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def check_same(self, value: Any, what: str) -> None:
        """Refuse to go on when the processes disagree on ``value`` (the data they read, the
        settings they parsed)."""
        seen = self.gather_objects(value)
        if any(v != seen[0] for v in seen[1:]):
            raise DeviceError(f"the {self.world} processes do not agree on {what}: each must read the same "
                              "files with the same flags")

    # ---------------------------------------------------------------- whole states
    def adapter_state(self, named: Sequence[tuple[str, Any]]) -> Optional[dict[str, Any]]:
        """The trainable tensors whole, on the CPU, keyed by parameter name, from FSDP's shards (every
        process must call it; the main process gets the tensors, the others None). None without FSDP:
        the parameters are whole already."""
        if not self.sharded:
            return None
        full = {name: _whole(p.detach()) for name, p in named}
        return full if self.is_main else None

    def optimizer_state(self, optimizer: Any, params: Sequence[Any]) -> dict[str, Any]:
        """The optimizer state in the format of a one-process ``optimizer.state_dict()`` (states keyed by
        the parameter's position in ``params``), FSDP's shards gathered whole (a collective)."""
        state = optimizer.state_dict()
        if not self.sharded:
            return state
        position = {id(p): i for i, p in enumerate(params)}
        whole: dict[int, dict[str, Any]] = {}
        for p in params:
            entry = optimizer.state.get(p)
            if entry:
                whole[position[id(p)]] = {k: _whole(v) for k, v in entry.items()}
        return {"state": whole, "param_groups": state["param_groups"]}

    def load_optimizer_state(self, optimizer: Any, params: Sequence[Any], state: dict[str, Any]) -> None:
        """Load a state written by :meth:`optimizer_state` (or by a one-process run): whole tensors are
        cut into this process's shards under FSDP."""
        if self.sharded:
            state = {"state": {i: {k: _shard_like(v, params[int(i)]) for k, v in entry.items()}
                               for i, entry in state["state"].items()},
                     "param_groups": state["param_groups"]}
        optimizer.load_state_dict(state)


def _whole(value: Any) -> Any:
    """A DTensor gathered whole onto the CPU; any other value as it is (a tensor copied to the CPU)."""
    import torch
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def _shard_like(value: Any, param: Any) -> Any:
    """A whole optimizer-state tensor cut like ``param`` (a DTensor) when it has the parameter's shape;
    other values (the step count) as they are."""
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(param.shape):
        return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return value


def _layer_classes(model: Any) -> set[type]:
    """The decoder- or encoder-layer classes of ``model`` that FSDP shards one by one: those named in
    the transformers model's ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def _shard(model: Any, device: Any, world: int) -> Any:
    """Shard ``model`` in place with FSDP2: each layer of :func:`_layer_classes`, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    classes = _layer_classes(model)
    layers = [m for m in model.modules() if type(m) in classes]
    if not layers:
        log.warning("FSDP: %s names no layer classes (_no_split_modules); the whole model is one unit, "
                    "gathered at once", type(model).__name__)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def single(device: Any) -> Group:
    """The group of a run in one process on ``device``."""
    return Group("single", device)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def join(strategy: str = "ddp", *, cpu: bool = False) -> Group:
    """This process's place in a run started by ``accelerate launch`` or ``torchrun``: creates the
    ``accelerate.Accelerator`` (which initialises the process group: NCCL on GPUs, gloo on the CPU) and
    returns the :class:`Group`. ``cpu`` keeps every process on the CPU. Under ``accelerate launch
    --use_fsdp`` the strategy is ``fsdp`` whatever ``strategy`` says.

    Raises:
        DeviceError: more processes on this machine than GPUs, or an unknown strategy.
    """
    check_strategy(strategy)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        strategy = "fsdp"
    gpus = 0 if cpu else _visible_gpus()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if gpus and local > gpus:
        raise DeviceError(f"{local} processes were started on this machine but it has {gpus} GPU"
                          f"{'s' if gpus != 1 else ''} (one process per GPU); start at most {gpus}, or pass "
                          "--device cpu")
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cpu or not gpus, mixed_precision="no")  # the trainer runs its own autocast
    group = Group(strategy, accelerator.device, accelerator)
    log.info("process %d of %d on %s (%s)", group.rank, group.world, group.device, strategy)
    return group
