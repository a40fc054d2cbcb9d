"""A batch crosses from a DataLoader worker with each side's chunks packed into two flat
tensors, arrives equal, and is pinned (when the loader pins) through the step's Part."""

from __future__ import annotations

import pickle

import torch
from torch.utils.data._utils.pin_memory import pin_memory

from retriever.train.batches import Batch, PackedChunks, TokenChunk
from retriever.train.loader import Part


def _chunk(rows: int, width: int, seed: int, left: bool = False) -> TokenChunk:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 99, (rows, width + 2), dtype=torch.int32, generator=g)[:, 1:-1]
    return TokenChunk(ids, torch.randint(1, width + 1, (rows,), generator=g), left)  # a view


def _batch() -> Batch:
    queries = [_chunk(3, 4, 0), _chunk(2, 1, 1)]
    documents = [_chunk(4, 6, 2, left=True), _chunk(0, 2, 3), _chunk(1, 5, 4, left=True)]
    return Batch(queries, documents, torch.tensor([1, 0, 4, 2, 3]), torch.arange(5),
                 torch.arange(5) * 7, 5, 40, scores=torch.ones(5))  # fmt: skip


def _assert_equal(got: Batch, want: Batch) -> None:
    for a, b in zip(got.query_chunks + got.document_chunks,
                    want.query_chunks + want.document_chunks, strict=True):  # fmt: skip
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.lengths, b.lengths)
        assert a.left_padding == b.left_padding
    for a, b in zip(got._rest(), want._rest(), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_a_pickled_batch_arrives_equal_and_packed():
    batch = _batch()
    got = pickle.loads(pickle.dumps(batch))
    _assert_equal(got, batch)
    queries, documents = got.packed
    assert queries.ids.numel() == 3 * 4 + 2 * 1 and documents.lengths.numel() == 5
    # The chunks are views of the two flat tensors: nothing was copied on arrival.
    base = documents.ids.untyped_storage().data_ptr()
    assert all(c.input_ids.untyped_storage().data_ptr() == base for c in got.document_chunks)
    _assert_equal(pickle.loads(pickle.dumps(got)), batch)  # and again, from the packed form


def test_replaced_chunks_are_packed_anew():
    got = pickle.loads(pickle.dumps(_batch()))
    got.query_chunks = got.query_chunks[0].split(1) + got.query_chunks[1:]  # 3 + 1 chunks
    again = pickle.loads(pickle.dumps(got))
    assert [c.size for c in again.query_chunks] == [1, 1, 1, 2]
    for a, b in zip(again.query_chunks, got.query_chunks, strict=True):
        assert torch.equal(a.input_ids, b.input_ids)


def test_an_empty_side_packs():
    assert PackedChunks.of([]).chunks() == []


def test_the_loader_pins_a_parts_batch(monkeypatch):
    """torch's pin_memory passes an object it does not know through unpinned; Part hands the
    call on to its batch, which pins its two flat tensors a side once it has them."""
    pinned = []

    def fake_pin(self):
        pinned.append(tuple(self.shape))
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    arrived = pickle.loads(pickle.dumps(_batch()))
    (part,) = pin_memory([Part(1, 2, arrived)])
    assert isinstance(part, Part) and (part.epoch, part.index) == (1, 2)
    _assert_equal(part.batch, _batch())
    # 2 flat tensors per side + query order, document order, candidate ids, scores
    assert len(pinned) == 2 * 2 + 4, pinned
    pinned.clear()  # a batch that never crossed (no workers) is packed to be pinned too
    _assert_equal(_batch().pin_memory(), _batch())
    assert len(pinned) == 2 * 2 + 4, pinned
