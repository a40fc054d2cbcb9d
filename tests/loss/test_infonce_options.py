"""InfoNCE's options (directions, partition_mode, hardness, false-negative margin, debias, label
smoothing, fused Matryoshka) against the float64 reference of tests/objective_reference.py, for
the PyTorch tiles and the Triton kernels (interpreted on CPU), within its error model.

Uneven shapes, hard negatives, permuted and shared positives, repeated candidate ids; tiles far
smaller than the inputs, so rows, columns, column splits, slabs and the self passes' diagonal
all fall inside tiles and across their edges.
"""

from __future__ import annotations

import pytest
import torch
from objective_reference import Options, option_bounds, option_terms, reference_option_loss
from reference import U32, UNIT_ROUNDOFF, gamma

from retriever.loss import InfoNCELoss, contrastive_loss, torch_tiles, triton_tiles
from retriever.loss.objective import DIRECTIONS, Objective

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL = DIRECTIONS
SYMMETRIC = Options(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
QUANTITIES = ("loss", "dq", "dd", "dscale")


def make_case(n_q, n_neg, dim, *, seed, ids=True, labels="default", dtype=torch.float32, norm=1.0):
    """(q, d, labels, ids, owners): positives pulled towards their queries; ``labels``:
    "default" (positive i is candidate i, sentence-transformers' layout, owners implied),
    "perm" (positives anywhere, owners given: each query's group is its positive and n_neg
    candidates, a few candidates belong to no query) or "repeat" (queries share positives)."""
    g = torch.Generator().manual_seed(seed)
    n_d = n_q * (1 + n_neg)
    q = torch.nn.functional.normalize(torch.randn(n_q, dim, generator=g), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(n_d, dim, generator=g), dim=-1)
    owners = None
    if labels == "default":
        lab = torch.arange(n_q)
    elif labels == "perm":
        order = torch.randperm(n_d, generator=g)
        lab = order[:n_q]
        owners = torch.full((n_d,), -1, dtype=torch.long)
        owners[order[: n_q * (1 + n_neg) - 2]] = torch.arange(n_q).repeat(1 + n_neg)[: n_d - 2]
        owners[lab] = torch.arange(n_q)
    else:
        lab = torch.randint(0, max(1, n_q // 2), (n_q,), generator=g)
    d[lab] = torch.nn.functional.normalize(d[lab] + 0.3 * q, dim=-1)
    cand_ids = None
    if ids:  # few distinct ids: duplicates of positives (and of other rows' positives) abound
        cand_ids = torch.randint(0, max(2, n_d // 3), (n_d,), generator=g)
    q, d = (q * norm).to(dtype), (d * norm).to(dtype)
    return q, d, lab, cand_ids, owners


def _run(case, opts: Options, impl: str, scale: float):
    q, d, labels, ids, owners = case
    q_in, d_in = q.clone().to(DEVICE).requires_grad_(), d.clone().to(DEVICE).requires_grad_()
    s = torch.tensor(scale, device=DEVICE, requires_grad=True)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    loss = contrastive_loss(
        q_in, d_in, scale=s, labels=None if owners is None and labels.equal(torch.arange(len(q)))
        else dev(labels), candidate_ids=dev(ids), candidate_owners=dev(owners), impl=impl,
        **opts.kwargs(),
    )  # fmt: skip
    loss.backward()
    return loss, q_in.grad, d_in.grad, s.grad


def _reference(case, opts: Options, scale: float):
    q, d, labels, ids, owners = case
    q64, d64 = q.double().requires_grad_(), d.double().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    loss = reference_option_loss(q64, d64, s, labels, ids, owners, opts)
    loss.backward()
    return loss, q64.grad, d64.grad, s.grad


def _clear_of_kinks(case, opts: Options, scale: float) -> None:
    """The loss is not smooth where a similarity meets the margin's threshold or debias's
    estimate its floor; there, rounding may take either side. The cases stay clear of both."""
    q, d, labels, ids, owners = case
    for k, _, normalize in opts.prefixes(q.shape[1]):
        blocks, pos, _ = option_terms(q, d, scale, labels, ids, owners, opts, k, normalize)
        if opts.margin is not None:
            # Both sides of the comparison move by the error model's dX at most.
            clearance = 2 * (3 * gamma(k) + 12 * U32) * float(q.float().norm(dim=1).max()) ** 2
            xpos = pos / scale
            for b in blocks.values():
                gap = float((b.x - xpos[:, None] - opts.margin).abs().min())
                assert gap > clearance, f"a similarity within {gap:.1e} of the margin: new seed"


def assert_matches(case, opts: Options, impl: str, scale: float = 20.0) -> None:
    _clear_of_kinks(case, opts, scale)
    q, d, labels, ids, owners = case
    got = _run(case, opts, impl, scale)
    want = _reference(case, opts, scale)
    sixteen = q.dtype in (torch.bfloat16, torch.float16)
    bounds = option_bounds(
        q, d, scale, labels, ids, owners, opts,
        u_g=UNIT_ROUNDOFF[q.dtype] if impl == "triton" and sixteen else 0.0,
        u_out=UNIT_ROUNDOFF.get(q.dtype, U32),
        u_in=2.0**-11 if impl == "triton" and q.is_cuda and not sixteen else 0.0,
    )  # fmt: skip
    for name, g, w, bound in zip(QUANTITIES, got, want, vars(bounds).values()):
        assert torch.isfinite(g).all(), f"{name}: NaN or inf"
        error = float((g.detach().double().cpu() - w.double()).norm())
        assert error <= bound, f"{name}: error {error:.2e} above the model's bound {bound:.2e}"


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles far smaller than the inputs (and not dividing them), so every path loops."""
    monkeypatch.setattr(torch_tiles, "ROW_CHUNK", 16)
    monkeypatch.setattr(torch_tiles, "COL_CHUNK", 24)
    monkeypatch.setattr(triton_tiles, "SPLIT_ALIGN", 64)
    monkeypatch.setattr(triton_tiles, "ROW_SLAB", 48)
    monkeypatch.setattr(triton_tiles, "COL_SLAB", 80)


OPTIONS = {
    "symmetric": SYMMETRIC,
    "qd+dq joint": Options(directions=("query_to_doc", "doc_to_query")),
    "qd+qq": Options(directions=("query_to_doc", "query_to_query")),
    "qd+dd": Options(directions=("query_to_doc", "doc_to_doc")),
    "gte": Options(directions=ALL),
    "in-batch hardness": Options(hardness_mode="in_batch_negatives", hardness_strength=9.0),
    "hard-negative hardness": Options(hardness_mode="hard_negatives", hardness_strength=5.0),
    "gte + all hardness": Options(
        directions=ALL, hardness_mode="all_negatives", hardness_strength=3.0
    ),
    "margin": Options(margin=0.1),
    "gte + margin (qwen3)": Options(directions=ALL, margin=0.1),
    "symmetric + margin": Options(**{**vars(SYMMETRIC), "margin": 0.05}),
    "debias": Options(debias=0.1),
    "gte + debias": Options(directions=ALL, debias=0.02),
    "symmetric + debias": Options(**{**vars(SYMMETRIC), "debias": 0.1}),
    "label smoothing": Options(label_smoothing=0.1),
    "gte + margin + smoothing": Options(directions=ALL, margin=0.1, label_smoothing=0.2),
    "symmetric + smoothing": Options(**{**vars(SYMMETRIC), "label_smoothing": 0.1}),
    "matryoshka": Options(dims=(48, 24, 8), weights=(1.0, 0.5, 0.25)),
    "matryoshka unnormalised": Options(dims=(48, 16), normalize=False),
    "matryoshka + gte + margin + hardness": Options(
        directions=ALL,
        margin=0.1,
        hardness_mode="in_batch_negatives",
        hardness_strength=4.0,
        dims=(48, 20, 5),
    ),  # fmt: skip
    "matryoshka + symmetric + debias": Options(
        **{**vars(SYMMETRIC), "debias": 0.05, "dims": (48, 12)}
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_torch_tiles_match_float64(small_tiles, name):
    # Uneven sizes: 37 queries, 3 negatives each, D = 48, tiles of 16 x 24.
    assert_matches(make_case(37, 3, 48, seed=1), OPTIONS[name], "torch")


OTHER_LABELS = [
    ("symmetric", "perm"),
    ("gte + margin (qwen3)", "perm"),
    ("gte + debias", "perm"),
    ("matryoshka + gte + margin + hardness", "perm"),
    # Shared positives: query_to_doc and doc_to_query only (no groups for doc_to_doc, no
    # margin with doc_to_query).
    ("symmetric", "repeat"),
    ("symmetric + debias", "repeat"),
    ("label smoothing", "repeat"),
]


@pytest.mark.parametrize("name,labels", OTHER_LABELS)
def test_torch_tiles_with_other_labels(small_tiles, name, labels):
    assert_matches(make_case(29, 2, 48, seed=2, labels=labels), OPTIONS[name], "torch")


@pytest.mark.parametrize("ids", [False, True])
@pytest.mark.parametrize("shape", [(1, 0, 16), (5, 1, 16), (40, 0, 24)])
def test_torch_tiles_edge_shapes(small_tiles, ids, shape):
    # One query (every other direction empty), pairs only (no hard negatives).
    n_q, n_neg, dim = shape
    opts = Options(directions=ALL, margin=0.2, label_smoothing=0.1)
    assert_matches(make_case(n_q, n_neg, dim, seed=3, ids=ids), opts, "torch")


TRITON_OPTIONS = [
    "symmetric",
    "gte",
    "gte + all hardness",
    "gte + margin + smoothing",
    "symmetric + debias",
    "matryoshka + gte + margin + hardness",
    "matryoshka + symmetric + debias",
]


@pytest.mark.parametrize("name", TRITON_OPTIONS)
def test_triton_kernels_match_float64(small_tiles, name):
    # Interpreted tiles of 32 x 32 and slabs of 48 x 80 (24 x 40 in self passes): 70 rows,
    # 140 candidates cross every edge, and the self passes skip slabs below the diagonal.
    assert_matches(make_case(70, 1, 48, seed=5), OPTIONS[name], "triton")


@pytest.mark.parametrize("labels", ["perm", "repeat"])
def test_triton_kernels_with_other_labels(small_tiles, labels):
    opts = OPTIONS["symmetric + debias"] if labels == "repeat" else OPTIONS["gte + margin (qwen3)"]
    assert_matches(make_case(33, 2, 16, seed=5, labels=labels), opts, "triton")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bfloat16_inputs(small_tiles, impl):
    # Inputs rounded before any math; the reference sees the same rounded values, and the model
    # adds the rounding of the returned gradients (and of Triton's G slab).
    case = make_case(40, 1, 32, seed=6, dtype=torch.bfloat16)
    assert_matches(case, Options(directions=ALL, margin=0.1, dims=(32, 8)), impl)


def test_triton_column_sums_that_overflow_are_recomputed(small_tiles, monkeypatch):
    # |S| reaches 60 * 16 = 960 while positives score near 300: a column's terms, summed
    # against its positive's logit, overflow fp32; those columns (and only those) are
    # recomputed exactly by the PyTorch tiles.
    recomputed = []
    exact = torch_tiles.forward_pass

    def spy(tp, scale):
        recomputed.append(tp.col.cols.shape[0])
        return exact(tp, scale)

    monkeypatch.setattr(torch_tiles, "forward_pass", spy)
    case = make_case(30, 1, 16, seed=7, norm=4.0)
    assert_matches(case, SYMMETRIC, "triton", scale=60.0)
    assert recomputed and 0 < recomputed[0] < 30


def test_symmetric_is_both_directions_averaged():
    q, d, _, ids, _ = make_case(12, 1, 16, seed=8)
    a = contrastive_loss(q, d, candidate_ids=ids, symmetric=True, impl="torch")
    b = contrastive_loss(q, d, candidate_ids=ids, directions=SYMMETRIC.directions,
                         partition_mode="per_direction", impl="torch")  # fmt: skip
    assert torch.equal(a, b)
    assert Objective(directions=("doc_to_query", "query_to_doc")).directions == (
        "query_to_doc", "doc_to_query"
    )  # fmt: skip


def test_error_model_bounds_are_far_below_real_defects(small_tiles):
    """A wrong mask, class or weight moves the result by far more than the model allows, so
    the comparisons above can fail."""
    case = make_case(37, 3, 48, seed=1)
    defects = [
        (Options(directions=ALL, margin=0.1), Options(directions=ALL, margin=0.15)),
        (Options(hardness_mode="in_batch_negatives", hardness_strength=9.0),
         Options(hardness_mode="all_negatives", hardness_strength=9.0)),
        (Options(directions=ALL), Options(directions=ALL[:3])),
        (Options(debias=0.1), Options(debias=0.11)),
        (Options(label_smoothing=0.1), Options(label_smoothing=0.11)),
        (SYMMETRIC, Options(directions=SYMMETRIC.directions)),
        (Options(dims=(48, 24)), Options(dims=(48, 24), weights=(1.0, 1.1))),
    ]  # fmt: skip
    q, d, labels, ids, owners = case
    for right, wrong in defects:
        bounds = option_bounds(q, d, 20.0, labels, ids, owners, right)
        want = _reference(case, right, 20.0)
        got = _reference(case, wrong, 20.0)
        ratios = [float((g - w).norm()) / b for g, w, b in zip(got, want, vars(bounds).values())]
        assert max(ratios) > 100, f"{wrong}: only {max(ratios):.1f}x the bound"


def test_infonce_module_carries_the_options():
    q, d, _, ids, _ = make_case(12, 1, 16, seed=9)
    opts = Options(directions=ALL, margin=0.1, hardness_mode="all_negatives",
                   hardness_strength=2.0, label_smoothing=0.1)  # fmt: skip
    loss_fn = InfoNCELoss(scale=20.0, impl="torch", **opts.kwargs())
    want = contrastive_loss(q, d, scale=20.0, candidate_ids=ids, impl="torch", **opts.kwargs())
    assert torch.equal(loss_fn(q, d, candidate_ids=ids), want)
    config = loss_fn.get_config_dict()
    assert config["directions"] == list(ALL) and config["false_negative_margin"] == 0.1


BAD = [
    (dict(directions=("query_to_query",)), "must include 'query_to_doc'"),
    (dict(directions=("query_to_doc", "docs")), "directions must be distinct names"),
    (dict(directions="query_to_doc"), "directions must be a tuple"),
    (dict(partition_mode="both"), "partition_mode must be one of"),
    (dict(directions=ALL, partition_mode="per_direction"), "partition_mode='per_direction'"),
    (dict(hardness_mode="hard"), "hardness_mode must be None or one of"),
    (dict(hardness_mode="hard_negatives", hardness_strength=-1.0), "hardness_strength must be"),
    (dict(false_negative_margin=float("nan")), "false_negative_margin must be a finite"),
    (dict(debias=1.0), "debias must be < 1"),
    (dict(label_smoothing=-0.1), "label_smoothing must be >= 0"),
    (dict(debias=0.1, label_smoothing=0.1), "debias and label_smoothing cannot be combined"),
    (dict(symmetric=True, directions=ALL), "symmetric=True means"),
    (dict(symmetric=True, partition_mode="joint"), "symmetric=True averages"),
    (dict(matryoshka_dims=[16, 99]), r"matryoshka_dims must be distinct sizes in \[1, 16\]"),
    (dict(matryoshka_dims=[16, 8], matryoshka_weights=[1.0]), "one number per matryoshka_dims"),
    (dict(matryoshka_weights=[1.0]), "matryoshka_weights needs matryoshka_dims"),
    (dict(candidate_owners=torch.full((8,), 5)), r"candidate_owners must be query indices"),
    (dict(candidate_owners=torch.zeros(8, dtype=torch.long)), "each query's positive"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    q, d = torch.randn(4, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match=message):
        contrastive_loss(q, d, impl="torch", **kwargs)


def test_owners_are_needed_where_the_layout_says_nothing():
    q, d = torch.randn(4, 16), torch.randn(7, 16)  # not a multiple of 4: no implied groups
    with pytest.raises(ValueError, match="pass candidate_owners"):
        contrastive_loss(q, d, directions=ALL, impl="torch")
    with pytest.raises(ValueError, match="pass candidate_owners"):
        contrastive_loss(q, d[:8], labels=torch.tensor([1, 0, 2, 3]),
                         hardness_mode="in_batch_negatives", hardness_strength=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="labels without repeats"):
        contrastive_loss(q, d, labels=torch.tensor([1, 1, 2, 3]), symmetric=True,
                         false_negative_margin=0.1, impl="torch")  # fmt: skip
