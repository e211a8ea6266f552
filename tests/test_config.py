"""The typed settings: choices from Literal types, finite numbers, config.yaml's sections, no side effects."""

import dataclasses
import math

import pytest

from softprompt.config import (SECTIONS, ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, choices,
                               default_run_name)
from softprompt.io import read_yaml, to_yaml


def test_literal_fields_list_their_choices():
    assert choices(ModelConfig, "prompt_depth") == ("input", "encoder", "all")
    assert choices(ModelConfig, "label_scoring") == ("first_mean", "sum", "mean")
    assert choices(TrainConfig, "wandb_mode") == ("online", "offline", "disabled")  # through `| None`
    assert choices(TrainConfig, "epochs") is None


@pytest.mark.parametrize("cls, kwargs, match", [
    (TrainConfig, {"epochs": math.inf}, r"--epochs must be a finite number > 0, got inf"),
    (TrainConfig, {"epochs": math.nan}, r"--epochs must be a finite number > 0, got nan"),
    (TrainConfig, {"epochs": 0}, r"--epochs must be a finite number > 0"),
    (TrainConfig, {"lr": -1.0}, r"--lr must be a finite number > 0"),
    (TrainConfig, {"dist_timeout": 0.0}, r"--dist_timeout must be a finite number > 0"),
    (TrainConfig, {"micro_batch": 0}, r"--micro_batch must be a finite number > 0"),
    (TrainConfig, {"resume": "auto", "overwrite": True}, r"--resume or --overwrite, not both"),
    (TrainConfig, {"select_metric": "f1"}, r"--select_metric must be one of accuracy, macro_f1, got 'f1'"),
    (TrainConfig, {"wandb_tags": "a,,b"}, r"empty tag"),
    (ModelConfig, {"prompt_max_norm": math.nan}, r"--prompt_max_norm must be a finite number > 0, got nan"),
    (ModelConfig, {"dropout": math.nan}, r"--dropout must be in \[0, 1\)"),
    (ModelConfig, {"prompt_init": "zeros"}, r"--prompt_init must be one of random, vocab, labels"),
    (ModelConfig, {"prompt_length": 0}, r"--prompt_length must be > 0 \(or 0 with --tune full\)"),
    (DataConfig, {"max_length": 1}, r"--max_length 1 cannot hold any text"),
])
def test_bad_values_are_one_line_errors(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kwargs)


def test_validation_has_no_side_effects(monkeypatch):
    """The W&B mode and run name are resolved when a run starts (softprompt.tracking.wandb_settings), not here."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    t = TrainConfig(wandb_project="p")
    assert t.wandb_mode is None and t.wandb_run_name is None
    assert dataclasses.asdict(t) == dataclasses.asdict(TrainConfig(wandb_project="p"))


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig(model=ModelConfig(prompt_length=7, verbalizer_words="正面,中性,负面"),
                    train=TrainConfig(ds_config={"train_batch_size": "auto", "optimizer": {"type": "AdamW"}}))
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg.to_dict()))
    assert RunConfig.from_dict(read_yaml(str(path))) == cfg
    assert set(read_yaml(str(path))) == set(SECTIONS)
    assert "正面" in path.read_text()  # readable, not escaped


def test_default_run_name():
    assert default_run_name(ModelConfig(model="google/mt5-xl", prompt_length=100, prompt_init="labels"), 0) == \
        "mt5-xl_pl100_init-labels_s0"
    assert default_run_name(ModelConfig(prompt_depth="all", reparam="residual"), 1) == \
        "tiny_pl50_init-labels_deep-all_residual_s1"
    assert default_run_name(ModelConfig(tune="full", prompt_length=0), 2) == "tiny_full_s2"
