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


@settings(max_examples=60, deadline=None)
@given(rows=sequences(), packed=st.booleans(), data=st.data())
def test_fixed_shape_batch_holds_the_plain_batch_and_no_more_targets(rows, packed, data):
    """``full_width`` and ``fixed_rows`` (the compiled blocks' one shape): the shape is (max(F, |R|),
    bank width); the plain batch is its top-left corner; every other label is −100, so the answer
    targets are the plain batch's at the same (row, column); filler rows repeat the first row's tokens."""
    from adapters.train.loss import answer_targets

    seqs = pack(rows, 64) if packed else rows
    bank = SequenceBank(seqs, 0)
    picks = data.draw(st.lists(st.integers(0, len(seqs) - 1), min_size=1, max_size=8), label="rows")
    fixed_rows = data.draw(st.integers(0, 10), label="fixed rows")
    plain, fixed = bank.collate(picks), bank.collate(picks, full_width=True, fixed_rows=fixed_rows)
    n, w = len(picks), plain["input_ids"].shape[1]
    width = max(len(s["input_ids"]) for s in seqs)
    for key in plain:
        assert fixed[key].shape == (max(n, fixed_rows), width) and fixed[key].dtype == plain[key].dtype, key
        assert torch.equal(fixed[key][:n, :w], plain[key]), key
    assert (fixed["labels"][:, w:] == IGNORE_INDEX).all() and (fixed["labels"][n:] == IGNORE_INDEX).all()
    assert torch.equal(fixed["input_ids"][n:], fixed["input_ids"][:1].expand(max(0, fixed_rows - n), -1))
    pi, pt = answer_targets(plain["labels"])
    fi, ft = answer_targets(fixed["labels"])
    assert torch.equal(ft, pt) and torch.equal(fi // width, pi // w) and torch.equal(fi % width, pi % w)


@pytest.mark.parametrize("packed", [True, False])
def test_fixed_shape_batch_gives_the_plain_loss_and_gradient(packed):
    """The answer loss and its gradient on a fixed-shape batch equal those on the plain batch, in
    float64 (padding columns come after every real token and filler rows have no target)."""
    from adapters.train.loss import answer_loss_sum, answer_targets
    from tiny_models import tiny_llama

    g = torch.Generator().manual_seed(3)
    rows = []
    for k in (9, 17, 5, 12):
        ids = torch.randint(3, 200, (k,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (k // 2) + ids[k // 2:]})
    seqs = pack(rows, 24) if packed else rows
    bank = SequenceBank(seqs, 0)
    model = tiny_llama(vocab=256, dtype=torch.float64)
    picks = [len(seqs) - 1]  # the shortest batch of one row: padded in width and rows
    out = []
    for b in (bank.collate(picks), bank.collate(picks, full_width=True, fixed_rows=3)):
        model.zero_grad()
        index, target = answer_targets(b.pop("labels"))
        loss = answer_loss_sum(model, b, index, target)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert bank.collate(picks, full_width=True, fixed_rows=3)["input_ids"].shape[1] > \
        bank.collate(picks)["input_ids"].shape[1]
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
