"""The saved model describes itself: a model card (README.md, as sentence-transformers writes
one) naming the base model, the training sources and their weights, the loss, the batch and the
last evaluation; and, when asked (``training.push_to_hub``), the final model on the Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retriever.train.run_directory import RunError


def model_card(
    config: Any,
    sources: list[Any],
    shares: list[int],
    state: Any,
    evaluation: dict[str, Any] | None,
) -> str:
    """Markdown with a YAML header (library, tags, base model), for final/ and the Hub."""
    m, t, loss = config.model, config.training, config.loss
    rows = "\n".join(
        f"| {s.name} | {s.task} | `{s.path}` | {s.weight:g} | {share} | {s.negatives} |"
        for s, share in zip(sources, shares)
    )
    objective = _objective(loss)
    if any(s.task == "sts" for s in sources):
        objective += f"; CoSENT (scale {loss.cosent_scale:g}) for STS sources"
    scores = "not evaluated"
    if evaluation:
        shown = {k: v for k, v in evaluation.items() if "main_score" in k or k.endswith("_at_10")}
        scores = f"at step {evaluation.get('step')}: " + json.dumps(shown, default=str)
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, feature-extraction, retriever]
base_model: {m.name_or_path}
---

# {Path(t.output_dir).name}

Fine-tuned from `{m.name_or_path}` with [retriever](https://github.com) for {state.step} steps
of {t.batch_size} queries (chunks of {t.chunk_size} texts; learning rate {t.learning_rate:g}).

| source | task | data | weight | rows a step | hard negatives |
|---|---|---|---|---|---|
{rows}

Loss: {objective}.

Evaluation of this model {scores}.

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("PATH_OR_REPO")
embeddings = model.encode_query(["a query"]), model.encode_document(["a document"])
```
"""


def _objective(loss: Any) -> str:
    """The retrieval sources' loss, in words."""
    name = {
        "infonce": "InfoNCE",
        "gcl": f"FastCLIP's global contrastive loss (FCCO, gamma_min {loss.gcl_gamma_min:g})",
        "sigmoid": f"the sigmoid loss (SigLIP, initial bias {loss.sigmoid_bias:g})",
    }[loss.objective]
    text = (
        f"{name}, temperature {loss.temperature:g}"
        + (" (learnable)" if loss.learnable_temperature else "")
        + (", symmetric" if loss.symmetric else "")
        + "".join(_infonce_options(loss))
        + ", within each retrieval source's batch (tiled, the ring across processes)"
    )
    if loss.matryoshka_dims:
        text += (
            f"; Matryoshka over the first {', '.join(map(str, loss.matryoshka_dims))} dimensions"
            " (load a prefix with `SentenceTransformer(path, truncate_dim=k)`, or evaluate it "
            "with `retriever eval --truncate-dim k`)"
        )
    if loss.distill_weight > 0:
        text += (
            f"; plus {loss.distill_weight:g} x KL distillation from the data's teacher scores "
            f"(teacher temperature {loss.teacher_temperature:g})"
        )
    return text


def _infonce_options(loss: Any) -> list[str]:
    """InfoNCE's options that are set, each as ``", name value"``."""
    said = []
    if loss.directions:
        said.append(f", directions {', '.join(loss.directions)} ({loss.partition_mode or 'joint'})")
    if loss.hardness_mode and loss.hardness_strength:
        said.append(f", hardness weighting of {loss.hardness_mode} ({loss.hardness_strength:g})")
    if loss.false_negative_margin is not None:
        said.append(f", false negatives masked above the positive + {loss.false_negative_margin:g}")
    if loss.debias:
        said.append(f", debiased (tau+ {loss.debias:g})")
    if loss.label_smoothing:
        said.append(f", label smoothing {loss.label_smoothing:g}")
    return said


def push_final(folder: Path, repo: str, where: str) -> str:
    """:func:`push_to_hub`, a failure named as the option's (``where`` it was set); its URL."""
    try:
        return push_to_hub(folder, repo)
    except Exception as exc:  # offline, no token, no rights: the local model stands
        raise RunError(
            f"{where}: training.push_to_hub: could not push {folder} to {repo!r} "
            f"({type(exc).__name__}: {exc}); the model is saved there, push it later with "
            "huggingface-cli upload"
        ) from None


def push_to_hub(folder: Path, repo: str) -> str:
    """Upload ``folder`` to the Hub model repository ``repo`` (created if needed); its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo,
        repo_type="model",
        commit_message="retriever train: final model",
    )
    return str(getattr(info, "commit_url", repo))
