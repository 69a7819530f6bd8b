import pytest

from hpcft.distenv import DistEnv
from hpcft.errors import SpecError
from hpcft.spec import spec_from_dict
from hpcft.train.config import TrainConfig
from hpcft.train.dist import Runtime
from hpcft.train.parallel import deepspeed_config


@pytest.mark.parametrize("train, field", [
    ({"strategy": "fsdp", "sharding_strategy": "HALF_SHARD"}, "train.sharding_strategy"),
    ({"precision": "fp8"}, "train.precision"),
    ({"quantization": "4bit"}, "train.quantization"),  # without LoRA
    ({"quantization": "4bit", "use_peft": True, "strategy": "fsdp"}, "train.quantization"),
    ({"low_cpu_fsdp": True}, "train.low_cpu_fsdp"),  # strategy ddp
    ({"offload_params": True, "strategy": "zero2"}, "train.offload_params"),
    ({"offload_optimizer": True, "strategy": "fsdp"}, "train.offload_optimizer"),
    ({"deepspeed_config": "x.json"}, "train.deepspeed_config"),
    ({"batching_strategy": "bucket"}, "train.batching_strategy"),
    ({"use_peft": True, "lora_target_modules": ["all-linear", "q_proj"]}, "train.lora_target_modules"),
    ({"lora_r": 0}, "train.lora_r"),
])
def test_conflicting_strategy_options(train, field):
    with pytest.raises(SpecError) as exc:
        spec_from_dict({"train": train})
    assert exc.value.field == field


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config_auto_fields_are_filled(stage):
    cfg = TrainConfig(strategy=f"zero{stage}", batch_size_training=3, gradient_accumulation_steps=4,
                      precision="bf16", offload_optimizer=True, offload_params=stage == 3,
                      gradient_clipping_threshold=0.5)
    rt = Runtime(env=DistEnv(world_size=8), device=None, backend="gloo")
    conf = deepspeed_config(cfg, rt, stage)
    assert "auto" not in str(conf)
    assert conf["train_batch_size"] == 3 * 4 * 8 and conf["train_micro_batch_size_per_gpu"] == 3
    assert conf["gradient_clipping"] == 0.5 and conf["bf16"]["enabled"] is True and conf["fp16"]["enabled"] is False
    assert conf["zero_optimization"]["stage"] == stage
    if stage == 3:  # the reduce bucket sized from the model, not a fixed 5e8 elements (2 GB per rank in fp32)
        sized = deepspeed_config(cfg, rt, stage, hidden_size=512)["zero_optimization"]
        assert sized["reduce_bucket_size"] == 512 * 512
    if stage >= 2:
        assert conf["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    if stage == 3:
        assert conf["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_login_node_knows_every_auto_field_the_ranks_fill(tmp_path):
    """hpcft.checks.DEEPSPEED_AUTO_FIELDS (checked before the queue) is what deepspeed_config fills."""
    import json

    from hpcft.checks import DEEPSPEED_AUTO_FIELDS

    conf: dict = {}
    for dotted in DEEPSPEED_AUTO_FIELDS:
        *parents, leaf = dotted.split(".")
        node = conf
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = "auto"
    path = tmp_path / "all_auto.json"
    path.write_text(json.dumps(conf))
    cfg = TrainConfig(strategy="zero3", deepspeed_config=str(path))
    assert "auto" not in str(deepspeed_config(cfg, Runtime(env=DistEnv(), device=None, backend="gloo"), 3))


def test_user_deepspeed_config_with_unknown_auto(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"zero_optimization": {"stage": 2, "mystery": "auto"}}')
    cfg = TrainConfig(strategy="zero2", deepspeed_config=str(p))
    with pytest.raises(SpecError, match="zero_optimization.mystery"):
        deepspeed_config(cfg, Runtime(env=DistEnv(), device=None, backend="gloo"), 2)


def test_train_flags_round_trip_through_the_rendered_args():
    from hpcft.train.config import parse_args

    cfg = TrainConfig(strategy="fsdp", sharding_strategy="HYBRID_SHARD", use_peft=True,
                      lora_target_modules=("q_proj", "k_proj", "v_proj"), lr=3e-4, tokenizer_name=None)
    assert parse_args(cfg.to_args()) == cfg


def test_adamw_is_fused_for_plain_parameters_and_foreach_for_dtensors():
    import torch

    from hpcft.train.optim import adamw_impl

    assert adamw_impl([torch.nn.Parameter(torch.zeros(3))]) == {"fused": True}
    assert adamw_impl([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]) == {"fused": True}

    class Wrapped(torch.Tensor):  # stands for DTensor and other tensor subclasses
        pass

    assert adamw_impl([torch.zeros(3).as_subclass(Wrapped)]) == {"foreach": True}
