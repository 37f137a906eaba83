"""Spreading one probe's work over several devices of this process, or over the processes of a
``torch.distributed`` group, with the answer of one device.

A :class:`Spread` has P parts, numbered 0 … P − 1; :meth:`Spread.map` runs ``fn(part, device)`` for
the parts it owns and returns every part's result (a tuple of tensors) in part order, on its home
device. Two kinds, one interface:

* :class:`DeviceSpread` — a device list (``devices=["cuda:0", "cuda:1"]``): one thread per part, each on
  its own device (inside ``torch.cuda.device``, so that Triton launches there too); CUDA kernels release
  the interpreter lock, so the devices compute at once. Results are copied to the first device, the
  home. A device may appear twice (two parts on one device).
* :class:`GroupSpread` — a process group (every process of ``torch.distributed``, e.g. under
  ``torchrun``): process p runs part p on the device of its input; the results are all-gathered, so
  every process returns the same answer. Every process must pass the same input (checked).

The probes split work whose pieces do not interact, so the answer does not depend on the split: the
exact δ's base points (``geoprobe.probes.hyperbolicity``) and the kNN's candidate products and query rows
(``geoprobe.backends.knn_certified``).
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import DeviceError

logger = logging.getLogger(__name__)

__all__ = ["Spread", "DeviceSpread", "GroupSpread", "spread_for", "share", "parse_devices"]

Part = Callable[[int, torch.device], tuple[torch.Tensor, ...]]
"""fn(part, device) → a tuple of tensors, each at least 1-D."""


def share(n: int, parts: int, part: int) -> slice:
    """Rows of ``part`` when ``n`` rows are cut into ``parts`` contiguous runs: ⌈n/parts⌉ rows for the
    first n mod parts runs, ⌊n/parts⌋ for the others."""
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return slice(start, start + base + (1 if part < extra else 0))


class Spread:
    """P parts of one computation (see the module docstring)."""

    parts: int
    home: torch.device
    kind: str
    devices: list[torch.device]  # the devices this process computes on

    def map(self, fn: Part) -> list[tuple[torch.Tensor, ...]]:  # pragma: no cover - interface
        raise NotImplementedError

    def owns(self, part: int) -> bool:
        """Whether this process computes ``part``."""
        return True

    def describe(self) -> str:
        """"2 devices", "4 processes": what the results' backend names."""
        return f"{self.parts} {self.kind}"


class DeviceSpread(Spread):
    """One part per device of ``devices``, each run by its own thread (module docstring)."""

    kind = "devices"

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.devices = list(devices)
        self.parts = len(self.devices)
        self.home = self.devices[0]

    def _run(self, fn: Part, part: int) -> tuple[torch.Tensor, ...]:
        dev = self.devices[part]
        if dev.type == "cuda":
            with torch.cuda.device(dev):
                out = fn(part, dev)
                torch.cuda.synchronize(dev)
        else:
            out = fn(part, dev)
        return tuple(t.to(self.home) for t in out)

    def map(self, fn: Part) -> list[tuple[torch.Tensor, ...]]:
        if self.parts == 1:
            return [self._run(fn, 0)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.parts) as pool:
            futures = [pool.submit(self._run, fn, j) for j in range(self.parts)]
            return [f.result() for f in futures]  # the first failure is raised here


class GroupSpread(Spread):
    """One part per process of ``group`` (``None``: the default group), on ``device`` (module docstring)."""

    kind = "processes"

    def __init__(self, group: Any, device: torch.device) -> None:
        import torch.distributed as dist

        self.group = group
        self.dist = dist
        self.parts = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.home = torch.device(device)
        self.devices = [self.home]
        # NCCL moves CUDA tensors only: results travel through this process's GPU, and come back home
        nccl = str(dist.get_backend(group)).lower() == "nccl"
        self.wire = torch.device("cuda", torch.cuda.current_device()) if nccl else self.home

    def owns(self, part: int) -> bool:
        return part == self.rank

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` (at least 1-D; any first-dimension size) of every process, in rank order."""
        t = t.to(self.wire).contiguous()
        as_bool = t.dtype == torch.bool
        if as_bool:
            t = t.to(torch.uint8)
        size = torch.tensor([t.shape[0]], dtype=torch.long, device=self.wire)
        sizes = [torch.zeros_like(size) for _ in range(self.parts)]
        self.dist.all_gather(sizes, size, group=self.group)
        lengths = [int(s) for s in sizes]
        padded = t.new_zeros((max(lengths), *t.shape[1:]))
        padded[:t.shape[0]] = t
        out = [torch.empty_like(padded) for _ in range(self.parts)]
        self.dist.all_gather(out, padded, group=self.group)
        got = [o[:n].to(self.home) for o, n in zip(out, lengths)]
        return [g.bool() for g in got] if as_bool else got

    def map(self, fn: Part) -> list[tuple[torch.Tensor, ...]]:
        mine = fn(self.rank, self.home)
        columns = [self._gather(t) for t in mine]
        return [tuple(col[p] for col in columns) for p in range(self.parts)]

    def check_same(self, x: torch.Tensor, what: str) -> None:
        """Refuse inputs that differ between the processes (each must pass the same points)."""
        x64 = x.detach().to(self.home, torch.float64).reshape(x.shape[0], -1)
        rows, cols = x64.sum(dim=1), x64.sum(dim=0)  # order-sensitive sums, O(rows + columns) memory
        mine = torch.stack([torch.tensor(float(x64.numel()), dtype=torch.float64, device=self.home), rows.sum(),
                            (rows * torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=self.home)).sum(),
                            (cols * torch.arange(1, cols.numel() + 1, dtype=torch.float64, device=self.home)).sum()])
        seen = self._gather(mine[None, :])
        if any(not torch.equal(s, seen[0]) for s in seen[1:]):
            raise DeviceError(f"the {self.parts} processes of the group passed different {what}; every "
                              "process must pass the same input")


def parse_devices(devices: Sequence[Any]) -> list[torch.device]:
    """``devices`` as torch devices, each one this machine has.

    Raises:
        DeviceError: an empty list, a name torch does not know, a CUDA device without CUDA or with an
            index beyond the GPUs present, or a device type other than cpu and cuda.
    """
    if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence) or not devices:
        raise DeviceError(f"devices must be a non-empty list such as ['cuda:0', 'cuda:1'], got {devices!r}")
    out = []
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for d in devices:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError):
            raise DeviceError(f"devices: {d!r} is not a device name (cpu, cuda, cuda:1)") from None
        if dev.type not in ("cpu", "cuda"):
            raise DeviceError(f"devices: {d!r} — the probes run on cpu and cuda devices")
        if dev.type == "cuda":
            index = 0 if dev.index is None else dev.index
            if index >= gpus:
                have = f"{gpus} GPU{'s' if gpus != 1 else ''}" if gpus else "no GPU"
                raise DeviceError(f"devices asks for {d} but this machine has {have}"
                                  + (f" (cuda:0 … cuda:{gpus - 1})" if gpus else ""))
            dev = torch.device("cuda", index)
        out.append(dev)
    return out


def spread_for(devices: Optional[Sequence[Any]], process_group: Any, device: Optional[torch.device] = None
               ) -> Optional[Spread]:
    """The :class:`Spread` that ``devices`` or ``process_group`` asks for (None when neither is given).

    ``process_group``: ``True`` for the default group, or a group handle; ``device`` is then this
    process's device (its input's).

    Raises:
        DeviceError: both given, a bad device list (:func:`parse_devices`), or a process group outside
            an initialised ``torch.distributed``.
    """
    if devices is not None and process_group is not None and process_group is not False:
        raise DeviceError("pass devices (several devices of this process) or process_group (the processes of "
                          "torch.distributed), not both")
    if devices is not None:
        return DeviceSpread(parse_devices(devices))
    if process_group is None or process_group is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DeviceError("process_group needs torch.distributed to be initialised (run under torchrun or "
                          "accelerate launch and call torch.distributed.init_process_group first)")
    return GroupSpread(None if process_group is True else process_group, device or torch.device("cpu"))
