"""The training sequences of a causal LM as tensors, made once, and micro-batches moved to the device
in one copy.

:class:`SequenceBank` holds the n answer-masked sequences (packed or not) right-padded to the longest
one, L, as three (n, L) int32 tables: token ids (padding ``pad_id``), labels (padding −100) and, for
packed sequences, position ids whose padding continues as a separate run 0, 1, 2, … (the layout of
:func:`adapters.data.collate`). A micro-batch of rows R is then one row selection per table and a cut
to the width W = max_{r∈R} len_r,

    input_ids = ids[R, :W],   labels = lab[R, :W],   position_ids = pos[R, :W]   (packed),
    attention_mask[i, t] = [t < len_{R_i}]                                        (not packed),

equal, element for element and in dtype (int64), to ``collate([seqs[r] for r in R], pad_id)``: the
padding of a row depends on its own length only (the position run of row i at column t ≥ len_i is
t − len_i, whatever W is), so cutting the full-width table gives the narrower batch. The Python lists
are turned into tensors once, instead of 3·|R| list conversions per micro-batch.

:func:`move_together` sends a micro-batch's int64 tensors to a CUDA device through one pinned host
buffer and one asynchronous copy (views of one device buffer come back) instead of one pinned
allocation, one host copy and one transfer per tensor; elsewhere each tensor is moved as it is.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from geoprobe.errors import DataFormatError

from ..data import IGNORE_INDEX, check_batch

__all__ = ["SequenceBank", "move_together"]


class SequenceBank:
    """Answer-masked sequences as padded int32 tables; :meth:`collate` makes a micro-batch (see the
    module docstring). Raises :class:`DataFormatError` for what :func:`adapters.data.collate` refuses
    (:func:`adapters.data.check_batch`)."""

    def __init__(self, seqs: Sequence[dict[str, list[int]]], pad_id: int) -> None:
        import torch

        self.packed = check_batch(seqs)
        lengths = np.array([len(s["input_ids"]) for s in seqs], dtype=np.int64)
        n, width = len(seqs), int(lengths.max())
        cols = np.arange(width, dtype=np.int64)
        filled = cols[None, :] < lengths[:, None]  # row-major: the tokens of row 0, then of row 1, …

        def table(key: str, fill: np.ndarray) -> Any:
            flat = np.fromiter((t for s in seqs for t in s[key]), dtype=np.int64, count=int(lengths.sum()))
            out = fill.copy()
            out[filled] = flat
            return torch.from_numpy(out.astype(np.int32))

        self.input_ids = table("input_ids", np.full((n, width), int(pad_id), dtype=np.int64))
        self.labels = table("labels", np.full((n, width), IGNORE_INDEX, dtype=np.int64))
        self.position_ids = (table("position_ids", cols[None, :] - lengths[:, None]) if self.packed else None)
        self.lengths = torch.from_numpy(lengths)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def width(self) -> int:
        """The longest sequence's length: the tables' width."""
        return int(self.input_ids.shape[1])

    def collate(self, rows: Sequence[int], *, fixed_rows: int = 0, full_width: bool = False) -> dict[str, Any]:
        """The micro-batch of sequences ``rows``: ``input_ids``, ``labels`` and ``position_ids``
        (packed) or ``attention_mask`` (not packed), int64, as :func:`adapters.data.collate` makes it.

        For a fixed shape (compiled blocks, CUDA graphs): ``full_width`` cuts at :attr:`width` instead of
        the batch's longest sequence (more padding, the same targets), and ``fixed_rows`` > len(rows)
        appends copies of the first row with every label −100 up to that many rows. Such a row has no
        target, so it adds nothing to the loss or to any gradient."""
        import torch

        if not rows:
            raise DataFormatError("cannot collate an empty batch")
        filler = max(0, fixed_rows - len(rows))
        idx = torch.as_tensor(list(rows) + [rows[0]] * filler, dtype=torch.long)
        lengths = self.lengths.index_select(0, idx)
        width = self.width if full_width else int(lengths.max())

        def pick(t: Any) -> Any:
            return t[:, :width].index_select(0, idx).long()

        out: dict[str, Any] = {"input_ids": pick(self.input_ids), "labels": pick(self.labels)}
        if filler:
            out["labels"][len(rows):] = IGNORE_INDEX
        if self.packed:
            out["position_ids"] = pick(self.position_ids)
        else:
            out["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return out


def move_together(tensors: Sequence[Any], device: Any) -> list[Any]:
    """``tensors`` on ``device``. On CUDA, int64 tensors go through one pinned buffer and one
    non-blocking copy (the host does not wait; the caching host allocator keeps the buffer until
    the copy has run); anything else, or another device, is moved tensor by tensor."""
    import torch

    if device.type != "cuda" or not tensors or any(t.dtype != torch.long for t in tensors):
        return [t.to(device) for t in tensors]
    sizes = [t.numel() for t in tensors]
    staging = torch.empty(sum(sizes), dtype=torch.long, pin_memory=True)
    torch.cat([t.reshape(-1) for t in tensors], out=staging)
    moved = staging.to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(moved.split(sizes), tensors)]
