"""adapters.train.batches: micro-batches cut from the tensorised sequences equal
``adapters.data.collate`` of the same rows (the oracle), element for element and in dtype, for packed
and unpacked sequences and any choice of rows; the same refusals; one-copy moves to the device keep
every value and shape (CPU, and CUDA under the gpu marker)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from adapters.data import IGNORE_INDEX, collate, pack
from adapters.train.batches import SequenceBank, move_together
from geoprobe.errors import DataFormatError


@st.composite
def sequences(draw, max_len: int = 40):
    """Answer-masked rows: random ids, a random prompt prefix labelled −100, the rest labelled with
    the ids (as tokenize_for_training makes them)."""
    n = draw(st.integers(1, 12))
    rows = []
    for _ in range(n):
        k = draw(st.integers(1, max_len))
        ids = draw(st.lists(st.integers(0, 49151), min_size=k, max_size=k))
        prompt = draw(st.integers(0, k))
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def _assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@settings(max_examples=60, deadline=None)
@given(rows=sequences(), packed=st.booleans(), data=st.data())
def test_bank_batches_equal_collate(rows, packed, data):
    seqs = pack(rows, 64) if packed else rows
    pad = data.draw(st.integers(0, 3), label="pad id")
    bank = SequenceBank(seqs, pad)
    picks = data.draw(st.lists(st.integers(0, len(seqs) - 1), min_size=1, max_size=8), label="rows")
    _assert_same(bank.collate(picks), collate([seqs[i] for i in picks], pad))


def test_bank_refuses_what_collate_refuses():
    good = {"input_ids": [1, 2], "labels": [-100, 2]}
    for bad in ([], [good, dict(good, position_ids=[0, 1])], [{"input_ids": [1, 2], "labels": [2]}]):
        with pytest.raises(DataFormatError) as want:
            collate(bad, 0)
        with pytest.raises(DataFormatError) as got:
            SequenceBank(bad, 0)
        assert str(got.value) == str(want.value)
    with pytest.raises(DataFormatError, match="empty batch"):
        SequenceBank([good], 0).collate([])


def test_move_together_on_the_cpu_returns_the_tensors():
    parts = [torch.arange(6).view(2, 3), torch.tensor([5, 7]), torch.ones(4)]
    moved = move_together(parts, torch.device("cpu"))
    assert all(a is b for a, b in zip(moved, parts))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_move_together_on_cuda_one_copy_same_values():
    parts = [torch.randint(0, 1000, (4, 9)), torch.randint(0, 1000, (4, 9)), torch.arange(11), torch.arange(11) * 3]
    moved = move_together(parts, torch.device("cuda"))
    assert len({m.untyped_storage().data_ptr() for m in moved}) == 1
    for m, p in zip(moved, parts):
        assert m.is_cuda and m.shape == p.shape and m.is_contiguous() and torch.equal(m.cpu(), p)
