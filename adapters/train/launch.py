"""Starting a fine-tune run on several processes: ``geoprobe finetune --num-processes N`` hands its own
command line to Accelerate's launcher (``python -m accelerate.commands.launch``, the ``accelerate
launch`` command), which starts N processes through ``torch.distributed.run`` (torchrun), one per
GPU, or N processes on the CPU; each of them runs the same command and joins the run
(:func:`adapters.train.parallel.join`).

Before anything is started, :func:`check_processes` refuses more processes than the machine has GPUs
(or CPU cores, for a CPU run). The environment the processes get keeps NVLink multicast (NVLS) off in
NCCL, torch's symmetric memory and NVSHMEM (:data:`MULTICAST_OFF`) unless the caller set those
variables; Accelerate's own mixed precision stays off (``--mixed_precision no``): the trainer runs its
own bf16 autocast on GPUs.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from typing import Optional, Sequence

from geoprobe.errors import DeviceError

log = logging.getLogger(__name__)

__all__ = ["MULTICAST_OFF", "check_processes", "launch_command", "launch_environment", "launch"]

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""Environment that keeps NVLink multicast off (set for the launched processes unless already set)."""


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _visible(env_name: str = "CUDA_VISIBLE_DEVICES") -> str:
    value = os.environ.get(env_name)
    return f" ({env_name}={value})" if value is not None else ""


def check_processes(n: object, device: Optional[str] = None, *, what: Optional[str] = None) -> str:
    """The device kind the ``n`` processes run on (``"cuda"`` or ``"cpu"``) after checking that the
    machine has them: at most one process per visible GPU, or per CPU core for a CPU run (``device``
    ``"cpu"``, or no GPU). ``what`` names the request in the messages (default ``--num-processes N``).

    Raises:
        DeviceError: ``n`` is not a positive integer, exceeds the GPUs (or cores), or ``device`` names one
            GPU (each process takes its own).
    """
    import torch

    what = what or f"--num-processes {n}"
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DeviceError(f"--num-processes must be a positive integer, got {n!r}")
    name = (device or "").strip().lower()
    if name and not (name == "cpu" or name.startswith("cuda")):
        raise DeviceError(f"--device {device}: several processes run on GPUs (cuda) or on the CPU (cpu)")
    if n > 1 and name.startswith("cuda:"):
        raise DeviceError(f"--device {device} names one GPU, but each of the {n} processes takes its own "
                          "(process p uses cuda:p); pass --device cuda, or limit the GPUs with CUDA_VISIBLE_DEVICES")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "cpu" or (not name and gpus == 0):
        cores = _cpu_cores()
        if n > cores:
            raise DeviceError(f"{what} asks for {n} processes on the CPU but this machine has {cores} "
                              f"core{'s' if cores != 1 else ''}; use at most {cores}")
        return "cpu"
    if n > gpus:
        have = f"{gpus} GPU{'s are' if gpus != 1 else ' is'} visible{_visible()}" if gpus else "no GPU is visible"
        raise DeviceError(f"{what} asks for {n} GPUs (one per process) but {have}; use at most "
                          f"{max(gpus, 1)}{'' if gpus else ', or pass --device cpu'}")
    return "cuda"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(argv: Sequence[str], n: int, *, module: str = "geoprobe", script: Optional[str] = None,
                   port: Optional[int] = None) -> list[str]:
    """The command that starts ``n`` processes of ``python -m <module> <argv>`` (or ``python <script>
    <argv>``) through Accelerate's launcher on this machine (torchrun underneath; ``--multi_gpu`` selects
    it, on the CPU as on GPUs)."""
    target = [script] if script is not None else ["-m", module]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--quiet",
            "--main_process_port", str(port if port is not None else _free_port()), *target, *argv]


def launch_environment(base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with :data:`MULTICAST_OFF` where unset."""
    env = dict(os.environ if base is None else base)
    for key, value in MULTICAST_OFF.items():
        env.setdefault(key, value)
    return env


def launch(argv: Sequence[str], n: int, *, module: str = "geoprobe") -> int:
    """Run ``python -m <module> <argv>`` on ``n`` processes (:func:`launch_command`) and wait; the
    launcher's exit code."""
    cmd = launch_command(argv, n, module=module)
    log.info("starting %d processes: %s", n, " ".join(cmd))
    return subprocess.run(cmd, env=launch_environment()).returncode
