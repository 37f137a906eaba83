"""Checkpoints of a fine-tune run: ``OUT/checkpoints/step-N`` with the adapter (PEFT files and
sidecar), the optimizer and scheduler states, the torch RNG states (dropout) and ``trainer_state.json``
(step, micro-batch count, loss history and the run's identity).

A checkpoint is written to a temporary folder and renamed into place; ``trainer_state.json`` is
written last, so a folder that has it is complete. Only the newest ``keep`` checkpoints are kept;
old ones are renamed away before their files are deleted.

A run of several processes (:mod:`.parallel`) writes the same files from its main process: the adapter
and the optimizer state whole, in the one-process format, and in ``rng.pt`` the RNG states of every
process under ``"ranks"`` beside those of process 0 at the top level (what a one-process run writes).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from geoprobe.errors import AdapterError, OutputError
from geoprobe.records import read_json, replace_folder, write_json

from ..io import check_adapter_state, write_adapter

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINTS", "ADAPTER", "RESULTS", "STATE", "list_checkpoints", "latest_checkpoint",
           "clean_partial", "check_out", "read_state", "write_checkpoint", "load_adapter_weights",
           "read_training_state", "rng_state", "set_rng_state", "describe_diff"]

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
RESULTS = "results.json"
STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(out: Union[str, os.PathLike]) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out/checkpoints`` as (step, folder), oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Union[str, os.PathLike]) -> Optional[Path]:
    """The newest complete checkpoint folder, or None."""
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def clean_partial(root: Path) -> None:
    """Remove temporary folders left by a run killed while writing or deleting a checkpoint."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def check_out(out: Union[str, os.PathLike], resume: bool) -> Optional[Path]:
    """The checkpoint to resume from (None for a fresh start) after checking that ``out`` may be used:
    without ``resume`` it must not hold an earlier run. Removes temporary folders of a killed run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder")
    clean_partial(out / CHECKPOINTS)
    latest = latest_checkpoint(out)
    if not resume and (latest is not None or (out / ADAPTER).exists() or (out / RESULTS).exists()):
        raise AdapterError(f"{out} already holds a fine-tune run (checkpoints, adapter or results); pass "
                           "--resume to continue it, or choose another --out")
    if resume and latest is None:
        log.warning("no checkpoint under %s: starting from the beginning", out / CHECKPOINTS)
    return latest if resume else None


def read_state(folder: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``folder``; a missing or corrupt file is an
    AdapterError naming it."""
    return read_json(folder / STATE, f"checkpoint state (delete {folder} to resume from the one before)",
                     error=AdapterError)


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states (CPU, and every visible GPU)."""
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states written by :func:`rng_state`."""
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _temporary_folder(root: Path, step: int) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".step-{step}.", suffix=".tmp", dir=root))
    except OSError as exc:
        raise OutputError(f"cannot write checkpoints under {root}: {exc.strerror or exc}") from None


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (renamed away before any file is deleted)."""
    for _, old in list_checkpoints(root.parent)[:-keep]:
        trash = Path(tempfile.mkdtemp(prefix=f".del-{old.name}.", dir=root))
        os.replace(old, trash / old.name)
        shutil.rmtree(trash, ignore_errors=True)


def write_checkpoint(root: Path, step: int, peft_model: Any, optimizer_state: dict[str, Any],
                     scheduler_state: dict[str, Any], rng: dict[str, Any], state: dict[str, Any], keep: int, *,
                     adapter_state: Optional[dict[str, Any]] = None) -> Path:
    """Write ``root/step-<step>`` atomically and keep the newest ``keep`` checkpoints: the adapter of
    ``peft_model`` (``adapter_state``: its trainable tensors whole, when the model's own are shards),
    the optimizer and scheduler states, the RNG states ``rng`` and ``trainer_state.json`` (``state``)."""
    import torch

    tmp = _temporary_folder(root, step)
    target = root / f"step-{step}"
    try:
        write_adapter(peft_model, tmp / ADAPTER, state_dict=adapter_state)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        write_json(tmp / STATE, state)  # last: a folder with trainer_state.json is complete
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep)
    log.info("checkpoint %s written", target)
    return target


def _unreadable(folder: Path, exc: Exception) -> AdapterError:
    return AdapterError(f"checkpoint {folder} cannot be read ({type(exc).__name__}: {exc}); delete it to "
                        "resume from the one before")


def load_adapter_weights(folder: Path, peft_model: Any) -> None:
    """Restore the adapter weights of checkpoint ``folder`` into ``peft_model`` (whole parameters: before
    any FSDP sharding)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(folder / ADAPTER / "adapter_model.safetensors"))
    except Exception as exc:
        raise _unreadable(folder, exc) from None
    check_adapter_state(peft_model, list(tensors), folder / ADAPTER)
    device = next(p for p in peft_model.parameters() if p.requires_grad).device
    set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in tensors.items()})


def read_training_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The optimizer state, the scheduler state and the RNG states of checkpoint ``folder`` (on the CPU)."""
    import torch

    try:
        return tuple(torch.load(folder / name, weights_only=True, map_location="cpu")  # type: ignore[return-value]
                     for name in ("optimizer.pt", "scheduler.pt", "rng.pt"))
    except Exception as exc:
        raise _unreadable(folder, exc) from None


def describe_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str:
    """The keys where two run identities differ, ``key: then, now``, at most 600 characters."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs.append(describe_diff(va, vb, f"{prefix}{key}."))
        else:
            sa, sb = json.dumps(va)[:40], json.dumps(vb)[:40]
            diffs.append(f"{prefix}{key}: {sa} then, {sb} now")
    return "; ".join(d for d in diffs if d)[:600]
