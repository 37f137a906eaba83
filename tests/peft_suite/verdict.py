"""Which failures of PEFT's tests on our rows are expected refusals.

A failure is an expected refusal when all of these hold:

- the method is not mergeable (:attr:`rows.MethodUnderTest.mergeable` is False);
- the test called a merge entry point (the first frame below the test code is one of
  :data:`MERGE_ENTRY_POINTS`: merging into the weights, or combining adapters with
  ``add_weighted_adapter``); ``unmerge_adapter`` is not one (with nothing merged it must only warn);
- the exception is our ``AdapterError`` (not a bare ``KeyError``, not an assertion on a wrong result);
- its message names the method and says that it cannot do this;
- the model is left as it was (:mod:`untouched` found no changed tensor and no half-built adapter).

Everything else is a failure.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["MERGE_ENTRY_POINTS", "Verdict", "entry_point", "judge"]

MERGE_ENTRY_POINTS = frozenset({
    "merge", "merge_adapter", "merge_and_unload", "_unload_and_optionally_merge", "get_delta_weight",
    "add_weighted_adapter",
})
_REFUSAL = re.compile(r"not mergeable|cannot|can't|does not support|not supported|refuse|no single weight delta",
                      re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    """refusal: the failure is an expected refusal; reason: why (or why not), one line."""

    refusal: bool
    reason: str


def entry_point(frames: Sequence[tuple[str, str]], test_dir: Path, skip: Path) -> Optional[str]:
    """The function the test code called that raised: the first frame after the last test-code frame.

    ``frames`` are ``(file, function)`` pairs from the outermost to the innermost frame; frames in the
    file ``skip`` (our wrapper around the entry points) do not count.
    """
    frames = [(path, name) for path, name in frames if Path(path) != skip]
    last = max((i for i, (path, _) in enumerate(frames) if Path(path).parent == test_dir), default=None)
    if last is None or last + 1 >= len(frames):
        return None
    return frames[last + 1][1]


def judge(error: BaseException, entry: Optional[str], method_name: str, mergeable: bool,
          error_type: type, changes: Optional[Sequence[str]]) -> Verdict:
    """Decide whether ``error``, raised under the test's call ``entry``, is ``method_name``'s refusal.

    ``changes``: what the refused call changed in the model (None when it was not checked, which
    happens only for calls below the model level, such as a layer's own ``merge``).
    """
    if mergeable:
        return Verdict(False, f"{method_name} is mergeable, so no merge refusal is expected")
    if entry not in MERGE_ENTRY_POINTS:
        return Verdict(False, f"raised under {entry!r}, which is not a merge entry point")
    if not isinstance(error, error_type):
        return Verdict(False, f"{type(error).__name__} raised, not our {error_type.__name__}")
    message = str(error)
    if method_name not in message or not _REFUSAL.search(message):
        return Verdict(False, f"the message does not say that {method_name} refuses: {message[:200]!r}")
    if changes:
        return Verdict(False, f"{method_name} refused {entry} but changed the model: {', '.join(changes[:5])}")
    return Verdict(True, f"{method_name} refuses {entry}: {message.splitlines()[0][:200]}")
