"""`train.sharding` without processes: which launches shard, and what is refused. (Sharded
training itself, two gloo processes against one, is in test_trainer_distributed.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from retriever.train.config import config_from_dict
from retriever.train.options import ConfigError
from retriever.train.sharding import clip_grad_norm, sharding_for


def _config(**model):
    return config_from_dict(
        {"model": {"name_or_path": "unused", **model}, "data": {"train": "unused.jsonl"},
         "training": {"output_dir": "unused"}},
        where="cfg.yaml",
    )  # fmt: skip


def _accelerator(kind: DistributedType, processes: int = 1):
    return SimpleNamespace(distributed_type=kind, num_processes=processes, device="cpu",
                           mixed_precision="no")  # fmt: skip


def test_one_process_or_no_option_does_not_shard():
    config = _config()
    two = _accelerator(DistributedType.MULTI_CPU, 2)
    assert sharding_for(config, two, None, [8], ["t"]) is None
    config.training.fsdp = True
    assert sharding_for(config, _accelerator(DistributedType.NO), None, [8], ["t"]) is None


def test_accelerate_fsdp_turns_the_option_on_and_checks_it():
    config = _config()
    assert sharding_for(config, _accelerator(DistributedType.FSDP), None, [8], ["t"]) is None
    assert config.training.fsdp  # one process: nothing to shard across, but the option is on
    with pytest.raises(ConfigError, match="training.fsdp keeps fp32 shards"):
        sharding_for(_config(dtype="bfloat16"), _accelerator(DistributedType.FSDP), None, [8],
                     ["t"])  # fmt: skip


def test_deepspeed_is_refused_with_a_message():
    with pytest.raises(ConfigError, match="DeepSpeed is not supported.*training.fsdp"):
        sharding_for(_config(), _accelerator(DistributedType.DEEPSPEED, 2), None, [8], ["t"])


def test_uneven_rows_are_refused_naming_the_source():
    config = _config()
    config.training.fsdp = True
    with pytest.raises(ConfigError, match="source 'sts' has 3 rows a step, which 2 processes"):
        sharding_for(config, _accelerator(DistributedType.MULTI_CPU, 2), None, [8, 3],
                     ["train", "sts"])  # fmt: skip


def test_clip_grad_norm_equals_torch_on_plain_gradients():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 4
    reference = [p.grad.clone() for p in params]
    norm = clip_grad_norm(params, 1.0)
    # torch's own, on copies: the same norm and the same clipped gradients
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, g in zip(copies, reference):
        c.grad = g.clone()
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(copies, 1.0))
    for p, c in zip(params, copies):
        torch.testing.assert_close(p.grad, c.grad)


def test_a_checkpoint_resumes_only_the_way_it_was_saved(tmp_path):
    import json

    from retriever.train.resume import check_same_sharding
    from retriever.train.run_directory import RunError

    for saved, now in ((True, False), (False, True)):
        (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, "sharded": saved}))
        check_same_sharding(tmp_path, saved)  # the same way: fine
        with pytest.raises(RunError, match="resume it the way it was saved"):
            check_same_sharding(tmp_path, now)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2}))  # before the option
    check_same_sharding(tmp_path, False)
