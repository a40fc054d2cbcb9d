"""contrastive_loss against an independent float64 reference, for every implementation.

The reference (tests/reference.py) builds the full logits in float64 and writes both directions
out directly, so it shares no code with the package; every tolerance comes from the rounding-error
model documented there, per quantity and per case.
"""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from reference import error_bounds, reference_loss

from retriever.loss import InfoNCELoss, contrastive_loss, torch_tiles, triton_tiles
from retriever.loss.inputs import NAIVE_MAX_LOGITS, resolve_impl

# On a GPU machine the same suite runs on CUDA (with compiled Triton kernels); in CI on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(
    n_queries,
    n_negatives,
    dim,
    *,
    seed,
    dtype=torch.float32,
    ids=False,
    permute=True,
    norm=1.0,
    pull=0.2,
):
    g = torch.Generator().manual_seed(seed)
    n_candidates = n_queries * (1 + n_negatives)
    q = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=g), dim=-1) * norm
    d = torch.nn.functional.normalize(torch.randn(n_candidates, dim, generator=g), dim=-1) * norm
    # Pull each positive towards its query, as in real data, but not so far that P = Y and the
    # gradients vanish (the loss stays of order 1 at D = 384 and s = 20).
    labels = (
        torch.randperm(n_candidates, generator=g)[:n_queries]
        if permute
        else torch.arange(n_queries)
    )
    d[labels] = torch.nn.functional.normalize(d[labels] + pull * q, dim=-1) * norm
    candidate_ids = None
    if ids:
        # Few distinct ids, so duplicates of positives (also of other rows' positives) abound.
        candidate_ids = torch.randint(0, max(2, n_candidates // 3), (n_candidates,), generator=g)
    if candidate_ids is not None:
        candidate_ids = candidate_ids.to(DEVICE)
    return q.to(DEVICE, dtype), d.to(DEVICE, dtype), labels.to(DEVICE), candidate_ids


def run_loss(q, d, scale, labels, candidate_ids, symmetric, impl):
    q = q.clone().requires_grad_()
    d = d.clone().requires_grad_()
    scale_t = torch.tensor(float(scale), device=DEVICE, requires_grad=True)
    loss = contrastive_loss(
        q,
        d,
        scale=scale_t,
        labels=labels,
        candidate_ids=candidate_ids,
        symmetric=symmetric,
        impl=impl,
    )
    loss.backward()
    return loss, q.grad, d.grad, scale_t.grad


def run_reference(q, d, scale, labels, candidate_ids, symmetric):
    q = q.double().requires_grad_()
    d = d.double().requires_grad_()
    scale_t = torch.tensor(float(scale), dtype=torch.float64, device=DEVICE, requires_grad=True)
    loss = reference_loss(q, d, scale_t, labels, candidate_ids, symmetric)
    loss.backward()
    return loss, q.grad, d.grad, scale_t.grad


QUANTITIES = ("loss", "d_queries", "d_candidates", "d_scale")


def errors_and_bounds(case, scale, symmetric, impl):
    """(|got - want| per quantity, the error model's bound per quantity)."""
    q, d, labels, ids = case
    got = run_loss(q, d, scale, labels, ids, symmetric, impl)
    want = run_reference(q, d, scale, labels, ids, symmetric)
    for name, g in zip(QUANTITIES, got):
        assert g.dtype == (torch.float32 if name in ("loss", "d_scale") else q.dtype), name
        assert torch.isfinite(g).all(), f"{name}: NaN or inf in the result"
    errors = [float((g.double() - w.double()).norm()) for g, w in zip(got, want)]
    bounds = error_bounds(
        q,
        d,
        scale,
        labels,
        ids,
        symmetric,
        tf32=impl == "triton" and q.is_cuda and q.dtype == torch.float32,
        gradient_slab_dtype=q.dtype if impl == "triton" else None,
    )
    return dict(zip(QUANTITIES, errors)), dict(zip(QUANTITIES, vars(bounds).values()))


def assert_matches_reference(case, scale, symmetric, impl):
    errors, bounds = errors_and_bounds(case, scale, symmetric, impl)
    for name in QUANTITIES:
        assert errors[name] <= bounds[name], (
            f"{name}: error {errors[name]:.2e} above the error model's bound {bounds[name]:.2e}"
        )


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles far smaller than the inputs (and not dividing them), so every path loops."""
    monkeypatch.setattr(torch_tiles, "ROW_CHUNK", 40)
    monkeypatch.setattr(torch_tiles, "COL_CHUNK", 72)
    monkeypatch.setattr(triton_tiles, "SPLIT_ALIGN", 64)
    monkeypatch.setattr(triton_tiles, "ROW_SLAB", 48)
    monkeypatch.setattr(triton_tiles, "COL_SLAB", 80)


SHAPES = list(itertools.product([1, 7, 64, 300], [0, 1, 7], [16, 48, 384, 1000]))


@pytest.mark.parametrize("n_queries,n_negatives,dim", SHAPES)
def test_torch_tiles_match_float64_reference(small_tiles, n_queries, n_negatives, dim):
    seed = n_queries * 1000 + n_negatives * 10 + dim
    # Each shape also varies the options, so every option meets every size class.
    symmetric = seed % 2 == 0
    ids = seed % 3 != 0
    case = make_case(n_queries, n_negatives, dim, seed=seed, ids=ids, permute=n_negatives > 0)
    assert_matches_reference(case, 20.0, symmetric, "torch")


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("ids", [False, True])
def test_every_option_on_one_shape(small_tiles, symmetric, ids):
    case = make_case(64, 7, 48, seed=3, ids=ids)
    for impl in ("naive", "torch"):
        assert_matches_reference(case, 20.0, symmetric, impl)


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
def test_large_scale_and_unnormalised_inputs_stay_finite(small_tiles, impl):
    # |S| reaches 100 * 25 = 2500: any exp without the max shift overflows fp32.  fp32 logits
    # that large carry ~2500 * 6e-8 of rounding into every exponent; the error model's bounds
    # grow with S_max accordingly.
    case = make_case(50, 3, 32, seed=5, ids=True, norm=5.0)
    assert_matches_reference(case, 100.0, True, impl)


TRITON_SHAPES = [(1, 0, 16), (7, 1, 48), (64, 7, 16), (30, 7, 100)]


@pytest.mark.parametrize("n_queries,n_negatives,dim", TRITON_SHAPES)
@pytest.mark.parametrize("symmetric,ids", [(False, False), (True, True)])
def test_triton_kernels_match_float64_reference(
    small_tiles, n_queries, n_negatives, dim, symmetric, ids
):
    case = make_case(n_queries, n_negatives, dim, seed=n_queries + dim, ids=ids)
    assert_matches_reference(case, 20.0, symmetric, "triton")


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(small_tiles, impl, dtype):
    # 16-bit inputs are rounded before any math, so compare with the reference on the same
    # rounded inputs; what remains is the rounding of gradients (and, for triton, of G and of
    # the GEMMs that read it), which the error model adds.
    case = make_case(40, 3, 64, seed=11, dtype=dtype, ids=True)
    assert_matches_reference(case, 20.0, True, impl)


def _defective_loss(q, d, scale, labels, ids, defect):
    """fp32 InfoNCE with one real defect: what the error model's bounds must be far below."""
    if defect == "scale off by 10%":
        scale = scale * 1.1
    logits = scale * q.float() @ d.float().T
    if defect != "duplicates not masked":
        dup = ids[None, :] == ids[labels][:, None]
        dup[torch.arange(len(labels)), labels] = False
        logits = logits.masked_fill(dup, float("-inf"))
    positive = logits[torch.arange(len(labels)), labels]
    if defect == "positive term dropped":
        positive = torch.zeros_like(positive)
    return (torch.logsumexp(logits, 1) - positive).mean()


def _case_with_copies(n_queries, n_negatives, dim, seed):
    """A case whose duplicate ids are real copies: some negatives repeat another query's
    positive verbatim (the same text embeds to the same vector), as in mined data."""
    q, d, labels, _ = make_case(n_queries, n_negatives, dim, seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(d.shape[0], device=d.device)
    others = torch.ones(d.shape[0], dtype=torch.bool)
    others[labels.cpu()] = False
    copies = torch.nonzero(others).squeeze(1)[: max(1, d.shape[0] // 8)]
    sources = labels.cpu()[torch.randint(0, n_queries, (len(copies),), generator=g)]
    d[copies] = d[sources]
    ids[copies] = ids[sources]
    return q, d, labels, ids


@pytest.mark.parametrize(
    "defect", ["scale off by 10%", "duplicates not masked", "positive term dropped"]
)
@pytest.mark.parametrize("n_queries,n_negatives,dim", [(7, 1, 48), (64, 7, 48), (300, 7, 384)])
def test_error_model_bounds_are_far_below_real_defects(n_queries, n_negatives, dim, defect):
    q, d, labels, ids = _case_with_copies(n_queries, n_negatives, dim, seed=21)
    bounds = error_bounds(q, d, 20.0, labels, ids)
    want_loss, want_dq, want_dd, _ = run_reference(q, d, 20.0, labels, ids, False)
    q, d = q.clone().requires_grad_(), d.clone().requires_grad_()
    loss = _defective_loss(q, d, 20.0, labels, ids, defect)
    loss.backward()
    ratios = [
        float((loss.double() - want_loss).abs()) / bounds.loss,
        float((q.grad.double() - want_dq).norm()) / bounds.dq,
        float((d.grad.double() - want_dd).norm()) / bounds.dd,
    ]
    assert max(ratios) > 100, f"{defect}: error only {max(ratios):.1f}x the bound"


def test_default_labels_need_enough_candidates():
    with pytest.raises(ValueError, match="at least as many as queries"):
        contrastive_loss(torch.randn(5, 8), torch.randn(4, 8))


Q, D5 = torch.randn(2, 8), torch.randn(5, 8)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(queries=torch.randn(5), candidates=torch.randn(5, 8)), "queries must be 2-D"),
        (
            dict(queries=torch.randn(5, 8), candidates=torch.randn(5, 8, 1)),
            "candidates must be 2-D",
        ),
        (dict(queries=torch.randn(5, 8), candidates=torch.randn(5, 9)), "embedding size: 8 vs 9"),
        (
            dict(queries=torch.randn(5, 8), candidates=torch.randn(5, 8).double()),
            "must be float32, bfloat16 or float16",
        ),
        (
            dict(queries=torch.randn(5, 8), candidates=torch.randn(5, 8).half()),
            "differ in dtype",
        ),
        (dict(queries=torch.randn(0, 8), candidates=torch.randn(5, 8)), "queries is empty"),
        (
            dict(
                queries=torch.randn(2, 8),
                candidates=torch.randn(0, 8),
                labels=torch.zeros(2).long(),
            ),
            "candidates is empty",
        ),
        (
            dict(
                queries=torch.randn(2, 8), candidates=torch.randn(5, 8), labels=torch.tensor([0, 5])
            ),
            r"lie in \[0, 5\)",
        ),
        (
            dict(
                queries=torch.randn(2, 8),
                candidates=torch.randn(5, 8),
                labels=torch.tensor([0, -1]),
            ),
            r"lie in \[0, 5\)",
        ),
        (
            dict(queries=Q, candidates=D5, labels=torch.tensor([0])),
            r"labels must have shape \(2,\)",
        ),
        (
            dict(
                queries=torch.randn(2, 8),
                candidates=torch.randn(5, 8),
                labels=torch.tensor([0.0, 1.0]),
            ),
            "labels must be an integer tensor",
        ),
        (
            dict(
                queries=torch.randn(2, 8),
                candidates=torch.randn(5, 8),
                candidate_ids=torch.arange(4),
            ),
            r"candidate_ids must have shape \(5,\)",
        ),
        (
            dict(queries=Q, candidates=D5, scale=torch.ones(2)),
            "0-dim",
        ),
        (
            dict(queries=Q, candidates=D5, impl="cuda"),
            "impl must be",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    q, d = kwargs.pop("queries"), kwargs.pop("candidates")
    with pytest.raises(ValueError, match=message):
        contrastive_loss(q, d, **kwargs)


def test_meta_device_mismatch_is_reported():
    with pytest.raises(ValueError, match="different devices"):
        contrastive_loss(torch.randn(2, 8), torch.randn(2, 8, device="meta"))


def test_auto_picks_naive_for_small_and_tiles_for_large_batches():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", 64, 512, cpu) == "naive"
    assert resolve_impl("auto", 4096, NAIVE_MAX_LOGITS // 4096 + 1, cpu) == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        contrastive_loss(torch.randn(2, 8), torch.randn(2, 8), impl="triton")


def test_infonce_module_learns_its_scale_and_clamps_it():
    q, d, labels, _ = make_case(16, 1, 8, seed=2)
    loss_fn = InfoNCELoss(scale=20.0, learnable_scale=True, max_scale=50.0).to(DEVICE)
    loss = loss_fn(q, d, labels=labels)
    loss.backward()
    # d loss / d log_scale = s * d loss / d s, with d loss / d s from the float64 reference.
    _, _, _, d_scale = run_reference(q, d, 20.0, labels, None, False)
    torch.testing.assert_close(loss_fn.log_scale.grad.double(), 20.0 * d_scale, rtol=1e-5, atol=0)
    with torch.no_grad():
        loss_fn.log_scale.fill_(10.0)  # e^10 >> 50
    assert loss_fn.scale.item() == pytest.approx(50.0)
    assert loss_fn.get_config_dict()["learnable_scale"] is True
    assert not InfoNCELoss(scale=20.0).log_scale.requires_grad
    with pytest.raises(ValueError, match="min_scale <= scale <= max_scale"):
        InfoNCELoss(scale=200.0)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from retriever.loss import contrastive_loss
    n, dim = 20_000, 64
    q = torch.nn.functional.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    d = torch.nn.functional.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    contrastive_loss(q[:64], d[:64], impl="torch").backward()  # warm up allocator and kernels
    q.grad = d.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    contrastive_loss(q, d, impl="torch").backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(after - before)
    """
)


@pytest.mark.skipif(DEVICE != "cpu", reason="measures the CPU process's peak memory")
def test_torch_tiles_memory_does_not_grow_with_batch_squared():
    """Bq = Bd = 20,000: fp32 logits alone would take 1.6 GB; the tiled path stays far below."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env, check=True
    )
    growth = int(out.stdout.strip().splitlines()[-1])
    logits_bytes = 20_000 * 20_000 * 4
    assert growth < logits_bytes / 5, f"peak memory grew by {growth / 1e9:.2f} GB"
