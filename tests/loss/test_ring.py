"""The ring loss across processes (gloo on CPU), against a float64 reference on the
concatenated batch (tests/ring_cases.py)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from objective_reference import Options
from ring_cases import Case, launch, make_batch, reference_global_loss, run_case
from torch import nn

from retriever.loss import InfoNCELoss, contrastive_loss, torch_tiles

# The DDP comparison below runs three SGD steps: each parameter moves by lr * gradient, so its
# error is lr * (sum of the steps' gradient errors, each far below 1e-6 for these sizes).
TOL = 1e-5


def _cases(world: int) -> list[Case]:
    return [
        Case(seed=10 * world, world=world),
        Case(seed=10 * world + 1, world=world, symmetric=True, ids=True, learnable_scale=True),
        Case(seed=10 * world + 2, world=world, labels="repeat", ids=True, learnable_scale=True),
        Case(seed=10 * world + 3, world=world, labels="none", symmetric=True, dim=5),
        Case(seed=10 * world + 4, world=world, labels="repeat", symmetric=True, ids=True),
    ]


def _assert_small(errors: dict[str, float], what: str) -> None:
    bad = {k: v for k, v in errors.items() if not v <= 1.0}
    assert not bad, f"{what}: errors above the error model's bound (as fractions of it): {bad}"


def _reference_worker(rank: int, world: int, impl: str) -> None:
    for case in _cases(world):
        _assert_small(run_case(case, dist.group.WORLD, impl=impl), f"rank {rank} {case}")
    # Tiles smaller than a block: positives (and their duplicates) fall in some tiles of some
    # blocks only, and block-local labels outside the block must still be handled per tile.
    torch_tiles.ROW_CHUNK, torch_tiles.COL_CHUNK = 2, 3  # this process only
    for case in _cases(world)[1:3]:
        _assert_small(run_case(case, dist.group.WORLD, impl=impl), f"rank {rank} small tiles")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_matches_float64_reference(world, tmp_path):
    launch(_reference_worker, world, str(tmp_path / "init"), "torch")


ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
SYMMETRIC = Options(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")


def _option_cases(world: int) -> list[Case]:
    """Every option, across uneven ranks; doc_to_query's columns come home from the ring."""
    seed = 100 * world
    return [
        Case(seed=seed, world=world, ids=True, learnable_scale=True, options=SYMMETRIC),
        Case(seed=seed + 1, world=world, labels="repeat", ids=True, options=SYMMETRIC),
        Case(seed=seed + 2, world=world, ids=True, owners=True, learnable_scale=True,
             options=Options(directions=ALL, margin=0.2, hardness_mode="in_batch_negatives",
                             hardness_strength=3.0)),
        Case(seed=seed + 3, world=world, labels="none", owners=True, dim=6,
             options=Options(directions=ALL, hardness_mode="hard_negatives",
                             hardness_strength=2.0, label_smoothing=0.1)),
        Case(seed=seed + 4, world=world, ids=True, learnable_scale=True,
             options=Options(directions=("query_to_doc", "doc_to_query"), debias=0.1)),
        Case(seed=seed + 5, world=world, owners=True, ids=True,
             options=Options(directions=ALL, dims=(8, 4, 2), weights=(1.0, 0.5, 0.5))),
    ]  # fmt: skip


def _options_worker(rank: int, world: int, impl: str) -> None:
    cases = _option_cases(world) if impl == "torch" else _option_cases(world)[2:3]
    for case in cases:
        _assert_small(run_case(case, dist.group.WORLD, impl=impl), f"rank {rank} {case}")


@pytest.mark.parametrize("world", [2, 3])
def test_ring_with_options_matches_float64_reference(world, tmp_path):
    launch(_options_worker, world, str(tmp_path / "init"), "torch")


@pytest.mark.slow  # 25 s on 2 cores; the kernels' options are tested in one process too
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1",
)
def test_ring_with_options_and_triton_kernels(tmp_path):
    launch(_options_worker, 2, str(tmp_path / "init"), "triton")


def _subgroup_worker(rank: int, world: int) -> None:
    # Every rank creates both groups (new_group is collective); each runs in its own, whose
    # group ranks differ from the global ones: the ring must address peers by global rank.
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group = groups[rank % 2]
    case = Case(seed=70 + rank % 2, world=2, symmetric=True, ids=True, learnable_scale=True)
    _assert_small(run_case(case, group), f"rank {rank} in a subgroup")
    # A group of one is the single-process loss.
    solo = [dist.new_group([r]) for r in range(world)][rank]
    case = Case(seed=84 + 2 * rank, world=1, ids=True, symmetric=True, learnable_scale=True)
    _assert_small(run_case(case, solo), "group of one")


def test_ring_in_subgroups(tmp_path):
    launch(_subgroup_worker, 4, str(tmp_path / "init"))


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1",
)
def test_ring_with_triton_kernels(tmp_path):
    # On a GPU machine both ranks share the GPU and gloo stages the blocks through the host.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    launch(_triton_worker, 2, str(tmp_path / "init"), device)


def _triton_worker(rank: int, world: int, device: str) -> None:
    case = Case(seed=5, world=world, symmetric=True, ids=True, learnable_scale=True, max_queries=3)
    # On a GPU the kernels multiply fp32 in TF32; run_case's error model knows.
    _assert_small(run_case(case, dist.group.WORLD, device=device, impl="triton"), f"rank {rank}")


def _local_inputs(rank: int, dim: int = 4, n: int = 3):
    q = torch.randn(n, dim, requires_grad=True)
    return q, torch.randn(n + 1, dim, requires_grad=True)


def _raises_everywhere(fn, expected: str) -> None:
    """fn must raise a ValueError containing `expected`, with the same message on every rank."""
    with pytest.raises(ValueError, match=expected) as info:
        fn()
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, str(info.value))
    assert len(set(messages)) == 1, messages


def _mismatch_worker(rank: int, world: int) -> None:
    group = dist.group.WORLD
    q, c = _local_inputs(rank, dim=5 if rank == 1 else 4)
    _raises_everywhere(
        lambda: contrastive_loss(q, c, group=group), r"embedding size D differs.*\[1\]"
    )
    q, c = _local_inputs(rank)
    empty = c[:0] if rank == 2 else c
    _raises_everywhere(
        lambda: contrastive_loss(q, empty, labels=torch.zeros(3, dtype=torch.long), group=group),
        "rank 2: candidates is empty",
    )
    ids = torch.arange(4) if rank == 0 else None
    _raises_everywhere(
        lambda: contrastive_loss(q, c, candidate_ids=ids, group=group), "candidate_ids must be"
    )
    half = q.half() if rank == 0 else q
    _raises_everywhere(lambda: contrastive_loss(half, c.to(half.dtype), group=group), "dtype")
    _raises_everywhere(
        lambda: contrastive_loss(q, c, scale=10.0 + rank, group=group), "scale must be the same"
    )
    margin = 0.1 if rank == 1 else None
    _raises_everywhere(
        lambda: contrastive_loss(q, c, false_negative_margin=margin, group=group),
        "options .* must be the same on every rank",
    )
    _raises_everywhere(  # a rank that cannot tell its candidates' queries: every rank raises
        lambda: contrastive_loss(q, c, directions=ALL, group=group), "rank .*candidate_owners"
    )
    # The group is still usable after the errors: a valid call matches the reference.
    _assert_small(run_case(Case(seed=3, world=world), group), "after errors")


def test_mismatch_raises_same_error_on_every_rank(tmp_path):
    launch(_mismatch_worker, 3, str(tmp_path / "init"))


def test_ring_needs_an_initialised_group():
    q = torch.randn(2, 4)
    with pytest.raises(ValueError, match="ProcessGroup|init_process_group"):
        contrastive_loss(q, q, group="world")


class _Tower(nn.Module):
    """A linear encoder and a loss with a learnable temperature, trained together."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(6, 4)
        self.loss = InfoNCELoss(scale=10.0, learnable_scale=True, symmetric=True, impl="torch")

    def forward(self, xq, xc, labels, ids, group):
        emb = self.encoder(torch.cat([xq, xc]))  # one forward call per step, as DDP expects
        return self.loss(emb[: len(xq)], emb[len(xq) :], labels, ids, group)


def _steps(world: int):
    """Per step: global inputs, per-rank sizes, local labels and global ids."""
    g = torch.Generator().manual_seed(123)
    for _ in range(3):
        n_q = [3, 5][:world]
        n_c = [7, 6][:world]
        xq = torch.randn(sum(n_q), 6, generator=g)
        xc = torch.randn(sum(n_c), 6, generator=g)
        labels = [torch.randperm(bd, generator=g)[:bq] for bq, bd in zip(n_q, n_c)]
        ids = torch.randint(0, 6, (sum(n_c),), generator=g)
        yield xq, xc, n_q, n_c, labels, ids


def _ddp_worker(rank: int, world: int) -> None:
    tower = _Tower()
    ddp = nn.parallel.DistributedDataParallel(tower)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for xq, xc, n_q, n_c, labels, ids in _steps(world):
        q0, c0 = sum(n_q[:rank]), sum(n_c[:rank])
        qs, cs = slice(q0, q0 + n_q[rank]), slice(c0, c0 + n_c[rank])
        opt.zero_grad()
        ddp(xq[qs], xc[cs], labels[rank], ids[cs], dist.group.WORLD).backward()
        opt.step()

    # One process, float64, the whole batch, the test's own naive loss.
    ref = _Tower().double()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for xq, xc, _, n_c, labels, ids in _steps(world):
        offsets = torch.tensor([0, *n_c]).cumsum(0)[:-1]
        glabels = torch.cat([lab + off for lab, off in zip(labels, offsets)])
        emb_q, emb_c = ref.encoder(xq.double()), ref.encoder(xc.double())
        loss, _ = reference_global_loss(emb_q, emb_c, ref.loss.log_scale.exp(), glabels, ids, True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for got, want in zip(tower.parameters(), ref.parameters()):
        torch.testing.assert_close(got.double(), want.detach(), rtol=TOL, atol=TOL)
    assert not torch.allclose(ref.encoder.weight, _Tower().encoder.weight.double())  # it trained


def test_ddp_training_matches_single_process(tmp_path):
    launch(_ddp_worker, 2, str(tmp_path / "init"))


def test_reference_batches_are_uneven():
    """The cases really exercise uneven sizes, shared positives and duplicated ids."""
    batch = make_batch(Case(seed=22, world=3, labels="repeat", ids=True))
    sizes = [s.stop - s.start for s in batch.c_slices]
    assert len(set(sizes)) > 1
    assert len(batch.ids.unique()) < len(batch.ids)
