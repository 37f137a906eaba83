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
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from geoprobe.errors import AdapterError, GeoprobeError, OutputError
from geoprobe.records import atomic_folder, read_json, write_json

from ..io import adapter_problems, check_adapter_state, write_adapter

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINTS", "ADAPTER", "RESULTS", "STATE", "list_checkpoints", "latest_checkpoint",
           "clean_partial", "check_out", "checkpoint_problems", "state_problem", "read_state",
           "write_checkpoint", "load_adapter_weights", "read_training_state", "rng_state", "set_rng_state",
           "describe_diff"]

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
RESULTS = "results.json"
STATE = "trainer_state.json"
PLAN = "plan.json"
_STATES = ("optimizer.pt", "scheduler.pt", "rng.pt")
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
    without ``resume`` it must not hold an earlier run; with it, the newest checkpoint must be whole
    (:func:`checkpoint_problems`), and so must OUT/plan.json where there is one. Removes temporary
    folders of a killed run.

    Raises:
        OutputError: ``out`` is a file.
        AdapterError: an earlier run without ``resume``; a checkpoint (or plan) that cannot be resumed,
            one sentence per broken file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder")
    clean_partial(out / CHECKPOINTS)
    latest = latest_checkpoint(out)
    if not resume and (latest is not None or (out / ADAPTER).exists() or (out / RESULTS).exists()):
        raise AdapterError(f"{out} already holds a fine-tune run (checkpoints, adapter or results); pass "
                           "--resume to continue it, or choose another --out")
    if not resume:
        return None
    if latest is None:
        log.warning("no checkpoint under %s: starting from the beginning", out / CHECKPOINTS)
    problems = checkpoint_problems(latest) if latest is not None else []
    plan = out / PLAN
    if plan.exists():
        from ..plan import AdapterPlan

        try:
            AdapterPlan.load(plan)
        except GeoprobeError as exc:
            problems.append(str(exc))
    if problems:
        where = f"checkpoint {latest}" if latest is not None else f"{out}"
        advice = (f"Delete {latest} to resume from the checkpoint before it, or start afresh in another --out"
                  if latest is not None else "Delete the broken file, or start afresh in another --out")
        raise AdapterError(f"--resume: {where} cannot be resumed: " + "; ".join(problems) + f". {advice}")
    return latest


_STATE_FIELDS = {
    "step": lambda v: _count(v, 1), "micro_step": lambda v: _count(v, 0), "total_steps": lambda v: _count(v, 1),
    "tokens_seen": lambda v: _count(v, 0), "seconds": lambda v: _finite(v) and v >= 0,
    "loss_steps": lambda v: isinstance(v, list) and all(_count(x, 1) for x in v),
    "loss_values": lambda v: isinstance(v, list) and all(_finite(x) for x in v),
    "run": lambda v: isinstance(v, dict),
}


def _count(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def state_problem(state: dict[str, Any]) -> Optional[str]:
    """What is wrong with the content of a ``trainer_state.json`` (None when every field is there with
    its type and the loss history pairs up)."""
    missing = [k for k in _STATE_FIELDS if k not in state]
    if missing:
        return f"{STATE} lacks {', '.join(missing)}"
    bad = [k for k, ok in _STATE_FIELDS.items() if not ok(state[k])]
    if bad:
        return f"{STATE} has unusable {', '.join(bad)}"
    if len(state["loss_steps"]) != len(state["loss_values"]):
        return f"{STATE} holds {len(state['loss_steps'])} loss steps but {len(state['loss_values'])} values"
    if state["step"] > state["total_steps"]:
        return f"{STATE} is at step {state['step']} of {state['total_steps']}"
    return None


def checkpoint_problems(folder: Path) -> list[str]:
    """Every broken file of checkpoint ``folder``, one sentence each (empty when it can be resumed):
    ``trainer_state.json`` (valid JSON with every field), the optimizer, scheduler and RNG states
    (readable by torch's restricted loader) and the adapter's files. Reads the states but builds
    nothing, so it runs before the model is loaded."""
    from geoprobe.models.safety import load_pickle

    problems = []
    try:
        state = read_json(folder / STATE, STATE, error=AdapterError)
        problem = state_problem(state)
        if problem:
            problems.append(problem)
    except AdapterError as exc:
        problems.append(_relative(str(exc), folder).removeprefix(f"{STATE}: "))
    for name in _STATES:
        try:
            load_pickle(folder / name, "", error=AdapterError)
        except GeoprobeError as exc:
            problems.append(_relative(str(exc), folder))
    problems.extend(_relative(p, folder) for p in adapter_problems(folder / ADAPTER))
    return problems


def _relative(message: str, folder: Path) -> str:
    """``message`` with the checkpoint folder's path left out of the file names it quotes."""
    return message.replace(f"{folder}{os.sep}", "")


def read_state(folder: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``folder``; a missing or corrupt file is an
    AdapterError naming it."""
    state = read_json(folder / STATE, f"checkpoint state (delete {folder} to resume from the one before)",
                      error=AdapterError)
    problem = state_problem(state)
    if problem:
        raise AdapterError(f"checkpoint {folder}: {problem}; delete it to resume from the one before")
    return state


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


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (renamed away before any file is deleted)."""
    for _, old in list_checkpoints(root.parent)[:-keep]:
        trash = Path(tempfile.mkdtemp(prefix=f".del-{old.name}.", dir=root))
        os.replace(old, trash / old.name)
        shutil.rmtree(trash, ignore_errors=True)


def write_checkpoint(root: Path, step: int, peft_model: Any, optimizer_state: dict[str, Any],
                     scheduler_state: dict[str, Any], rng: dict[str, Any], state: dict[str, Any], keep: int, *,
                     adapter_state: Optional[dict[str, Any]] = None) -> Path:
    """Write ``root/step-<step>`` atomically (:func:`geoprobe.records.atomic_folder`: a refused write is
    one OutputError and leaves neither a partial checkpoint nor an empty ``root``) and keep the newest
    ``keep`` checkpoints: the adapter of ``peft_model`` (``adapter_state``: its trainable tensors whole,
    when the model's own are shards), the optimizer and scheduler states, the RNG states ``rng`` and
    ``trainer_state.json`` (``state``)."""
    target = root / f"step-{step}"
    with atomic_folder(target, what="the checkpoint") as tmp:
        write_adapter(peft_model, tmp / ADAPTER, state_dict=adapter_state)
        _save_torch(optimizer_state, tmp / "optimizer.pt")
        _save_torch(scheduler_state, tmp / "scheduler.pt")
        _save_torch(rng, tmp / "rng.pt")
        write_json(tmp / STATE, state)  # last: a folder with trainer_state.json is complete
    _prune(root, keep)
    log.info("checkpoint %s written", target)
    return target


def _save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so a refused write is an OSError with its error number
    (torch's own file writer reports a full disk as an unexplained RuntimeError)."""
    import torch

    with open(path, "wb") as fh:
        torch.save(obj, fh)


def _what(folder: Path) -> str:
    return f"checkpoint {folder} (delete it to resume from the one before)"


def load_adapter_weights(folder: Path, peft_model: Any) -> None:
    """Restore the adapter weights of checkpoint ``folder`` into ``peft_model`` (whole parameters: before
    any FSDP sharding)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = folder / ADAPTER / "adapter_model.safetensors"
    try:
        tensors = load_file(str(weights))
    except Exception as exc:
        raise AdapterError(f"{_what(folder)}: {weights.name} cannot be read ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    check_adapter_state(peft_model, list(tensors), folder / ADAPTER)
    device = next(p for p in peft_model.parameters() if p.requires_grad).device
    set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in tensors.items()})


def read_training_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The optimizer state, the scheduler state and the RNG states of checkpoint ``folder`` (on the CPU,
    read without executing code: :func:`geoprobe.models.safety.load_pickle`)."""
    from geoprobe.models.safety import load_pickle

    return tuple(load_pickle(folder / name, _what(folder), error=AdapterError)  # type: ignore[return-value]
                 for name in _STATES)


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
