import json
from pathlib import Path

import pytest
import torch

from softprompt import engine
from softprompt.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "ds_configs").glob("*.json"))


def test_ships_the_configs():
    assert {p.name for p in SHIPPED} == {"zero3_cpu.json", "zero3_cpu_bf16.json", "zero3_cpu_bf16_full.json",
                                         "zero3_cpu_bf16_deep.json",
                                         "zero3_cpu_adafactor.json", "zero3_bf16.json", "zero3_bf16_offload.json"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path, monkeypatch):
    from deepspeed.runtime import config as ds_runtime_config
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig falls back to world size 1 when no process group exists; pretend rank 0.
    monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda: 0)

    cfg = engine.load_ds_config(path)
    assert engine.zero_stage(cfg) == 3
    zero = cfg["zero_optimization"]
    # The prompt must stay resident (not re-gathered every step): 100 tokens x 256 (tiny) for the
    # CPU config, 100 x 4096 (mT5-XXL) for the GPU ones; and no ~1 GB default reduce bucket.
    need = 100 * (256 if "cpu" in path.name else 4096)
    if "deep" in path.name:  # deep prompts: a (4 + 4 layers, 100, 256) tensor on the tiny model
        need = 8 * 100 * 256
    assert zero["stage3_param_persistence_threshold"] >= need
    assert zero["reduce_bucket_size"] <= 10_000_000
    assert not cfg.get("fp16", {}).get("enabled", False)
    for world in (1, 2):
        sizes = engine.batch_sizes(cfg, world)
        ds = DeepSpeedConfig(json.loads(path.read_text()), mpu=_World(world))
        assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (
            sizes.global_batch, sizes.micro_batch, sizes.grad_accum)
    opt = cfg["optimizer"]
    if "cpu" in path.name and opt["type"] == "AdamW":
        assert opt["params"]["torch_adam"] is True  # no compiled ops on CPU
    if opt["type"] == "Adafactor":  # built by us as a client optimizer, which ZeRO calls untested
        assert cfg["zero_allow_untested_optimizer"] is True
        assert engine.client_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2, 2))])[1] is not None
    assert cfg.get("bf16", {}).get("enabled", False) == ("bf16" in path.name)


class _World:
    """Just enough of an mpu for DeepSpeedConfig to read the data-parallel world size."""

    def __init__(self, n):
        self.n = n

    def get_data_parallel_world_size(self):
        return self.n

    def get_data_parallel_rank(self):
        return 0


@pytest.mark.parametrize(
    "triple, world, expected",
    [
        ((32, 16, None), 2, (32, 16, 1)),
        ((32, 16, None), 1, (32, 16, 2)),
        ((None, 4, 2), 2, (16, 4, 2)),
        ((None, 4, None), 3, (12, 4, 1)),
        ((24, None, 2), 3, (24, 4, 2)),
        ((8, 2, 2), 2, (8, 2, 2)),
    ],
)
def test_batch_triple_resolves(triple, world, expected):
    cfg = dict(zip(("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"), triple))
    cfg = {k: v for k, v in cfg.items() if v is not None}
    s = engine.batch_sizes(cfg, world)
    assert (s.global_batch, s.micro_batch, s.grad_accum, s.world_size) == (*expected, world)


@pytest.mark.parametrize(
    "cfg, world, match",
    [
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2}, 2,
         r"32 != train_micro_batch_size_per_gpu 16 x gradient_accumulation_steps 2 x world size 2"),
        ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 16}, 2, "not divisible"),
        ({"train_batch_size": 5, "gradient_accumulation_steps": 2}, 2, "not divisible"),
        ({"gradient_accumulation_steps": 2}, 1, "set train_batch_size"),
        ({"train_batch_size": 0}, 1, "positive integer"),
    ],
)
def test_batch_triple_inconsistent(cfg, world, match):
    with pytest.raises(ConfigError, match=match):
        engine.batch_sizes(cfg, world)


def test_ds_config_errors(tmp_path):
    p = tmp_path / "ds.json"
    with pytest.raises(ConfigError, match="file not found"):
        engine.load_ds_config(p)
    p.write_text('{\n  "train_batch_size": 8,\n  "optimizer": {,}\n}')
    with pytest.raises(ConfigError, match=r"ds\.json: line 3: invalid JSON"):
        engine.load_ds_config(p)
    p.write_text(json.dumps({"train_batch_size": 8, "fp16": {"enabled": True}, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match="mT5 overflows in fp16"):
        engine.load_ds_config(p)
    p.write_text(json.dumps({"train_batch_size": 8}))
    with pytest.raises(ConfigError, match="optimizer"):
        engine.load_ds_config(p)


def test_untied_checkpoint_is_detected(tiny_model_dir):
    assert engine.checkpoint_has_lm_head(str(tiny_model_dir))


def test_unknown_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--model .*nope"):
        engine.load_model_config(str(tmp_path / "nope"))
