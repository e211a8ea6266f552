"""The DeepSpeed JSON: shipped configs found by name from anywhere, "auto" resolved for any world size, and
everything DeepSpeed would choke on (or silently misuse) refused with one line."""

import copy
import json
from pathlib import Path

import pytest
import torch

from launcher.main import main
from softprompt import dsconfig, engine
from softprompt.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "ds_configs").glob("*.json"))
WORLDS = (1, 2, 4, 8, 16, 32, 64)


def test_ships_the_configs_as_package_data():
    assert {p.stem for p in SHIPPED} == {
        "zero3_cpu", "zero3_cpu_bf16", "zero3_cpu_bf16_full", "zero3_cpu_bf16_deep", "zero3_cpu_adafactor",
        "zero3_bf16", "zero3_bf16_offload", "replicated_cpu", "replicated_bf16"}
    assert dsconfig.SHIPPED_DIR.resolve() == (ROOT / "ds_configs").resolve()  # installed from the same files
    assert dsconfig.shipped() == sorted(p.stem for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_resolves_at_every_world_size(path):
    raw, source = dsconfig.load(path.stem)  # by name
    assert Path(source) == dsconfig.SHIPPED_DIR / path.name
    settings = None
    for world in WORLDS:
        resolved, sizes, _ = dsconfig.resolve(raw, source, world)
        dsconfig.check_with_deepspeed(resolved, source)  # DeepSpeed's own parse
        assert sizes.global_batch == max(32, world) and sizes.world_size == world
        assert sizes.global_batch == sizes.micro_batch * sizes.grad_accum * world
        assert sizes.micro_batch <= dsconfig.CPU_MICRO_BATCH_CAP
        settings = dsconfig.Settings.of(resolved)
        assert isinstance(settings.lr, float) and settings.lr > 0
    assert settings.stage == (0 if path.stem.startswith("replicated") else 3)
    assert settings.bf16 == ("bf16" in path.stem)
    assert not raw.get("fp16", {}).get("enabled", False)
    if settings.stage == 3:
        zero = raw["zero_optimization"]
        # The prompt must stay resident (not re-gathered every step): 100 tokens x 256 (tiny) on CPU, 100 x 4096
        # (mT5-XXL) on GPU, a (4 + 4 layers, 100, 256) deep prompt for the deep config; no ~1 GB reduce bucket.
        need = 8 * 100 * 256 if "deep" in path.stem else 100 * (256 if "cpu" in path.stem else 4096)
        assert zero["stage3_param_persistence_threshold"] >= need
        assert zero["reduce_bucket_size"] <= 10_000_000
    opt = raw["optimizer"]
    if "cpu" in path.stem and opt["type"] == "AdamW":
        assert opt["params"]["torch_adam"] is True  # no compiled ops on CPU
    if opt["type"] == "Adafactor":  # built by us as a client optimizer, which ZeRO calls untested
        assert raw["zero_allow_untested_optimizer"] is True
        assert engine.client_optimizer(raw, [torch.nn.Parameter(torch.zeros(2, 2))])[1] is not None


@pytest.mark.parametrize("name", ["zero3_bf16", "zero3_bf16_offload", "replicated_bf16", "zero3_cpu"])
@pytest.mark.parametrize("world", [8, 64])
def test_dry_run_validates_the_readme_commands_at_cluster_sizes(name, world, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    rc = main(["--ds_config", name, "--dry_run", "--inews_content_chars", "0", "--max_length", "24",
               "--prompt_length", "100", "--output_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0, out
    g = max(32, world)
    assert f"batch: global {g} = micro {g // world} x accum 1 x world {world}" in out
    assert "lr 0.3" in out and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "triple, world, flags, expected",
    [
        (("auto", "auto", "auto"), 1, {}, (32, 16, 2)),
        (("auto", "auto", "auto"), 2, {}, (32, 16, 1)),
        (("auto", "auto", "auto"), 3, {}, (33, 11, 1)),  # 32 rounded up to a multiple of 3
        (("auto", "auto", "auto"), 64, {}, (64, 1, 1)),
        (("auto", "auto", "auto"), 4, {"global_batch": 64, "micro_batch": 2}, (64, 2, 8)),
        (("auto", "auto", "auto"), 2, {"global_batch": 48}, (48, 12, 2)),
        ((32, "auto", "auto"), 8, {}, (32, 4, 1)),
        ((None, 4, 2), 2, {}, (16, 4, 2)),  # no global batch given: it follows the world size
        ((None, 4, None), 3, {}, (12, 4, 1)),
        ((24, None, 2), 3, {}, (24, 4, 2)),
        ((32, 16, None), 1, {}, (32, 16, 2)),
        ((8, 2, 2), 2, {}, (8, 2, 2)),
    ],
)
def test_batch_triple_resolves(triple, world, flags, expected):
    cfg = {k: v for k, v in zip(dsconfig.BATCH_KEYS, triple) if v is not None}
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 0.1}}
    before = copy.deepcopy(cfg)
    resolved, s, _ = dsconfig.resolve(cfg, "ds.json", world, **flags)
    assert (s.global_batch, s.micro_batch, s.grad_accum, s.world_size) == (*expected, world)
    assert [resolved[k] for k in dsconfig.BATCH_KEYS] == list(expected)
    assert cfg == before  # the input is never rewritten


@pytest.mark.parametrize(
    "triple, world, flags, match",
    [
        ((32, 16, 2), 2, {}, r"train_batch_size 32 != train_micro_batch_size_per_gpu 16 x gradient_accumulation_steps "
                             r"2 x world size 2"),
        ((30, 16, None), 2, {}, r"micro-batch 16 does not divide .* 15 per rank: use --micro_batch 1, 3, 5, 15"),
        ((5, None, 2), 2, {}, r"global batch 5 cannot be split over 2 ranks.*--global_batch 4 or 6"),
        (("auto", "auto", "auto"), 2, {"micro_batch": 5}, r"use --micro_batch 1, 2, 4, 8, 16"),
        ((32, "auto", "auto"), 2, {"global_batch": 64}, r"--global_batch 64: ds.json fixes train_batch_size = 32"),
        ((0, None, None), 1, {}, "positive integer"),
        ((True, None, None), 1, {}, "positive integer"),  # a bool is not a batch size
    ],
)
def test_batch_triple_errors_name_valid_choices(triple, world, flags, match):
    cfg = {k: v for k, v in zip(dsconfig.BATCH_KEYS, triple) if v is not None}
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 0.1}}
    with pytest.raises(ConfigError, match=match):
        dsconfig.resolve(cfg, "ds.json", world, **flags)


def test_lr_auto_flag_and_conflict():
    auto = {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    assert dsconfig.resolve(auto, "ds", 1)[0]["optimizer"]["params"]["lr"] == 0.3  # the default rule's
    assert dsconfig.resolve(auto, "ds", 1, lr=0.05)[0]["optimizer"]["params"]["lr"] == 0.05
    assert dsconfig.resolve(auto, "ds", 1, default_lr=0.03)[1].global_batch == 8
    fixed = copy.deepcopy(auto)
    fixed["optimizer"]["params"]["lr"] = 0.1
    assert dsconfig.resolve(fixed, "ds", 1, lr=0.1)[0]["optimizer"]["params"]["lr"] == 0.1  # agreeing is fine
    with pytest.raises(ConfigError, match=r"--lr 0.2: ds fixes optimizer.params.lr = 0.1; set it to \"auto\""):
        dsconfig.resolve(fixed, "ds", 1, lr=0.2)


BASE = {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}, "zero_optimization": {"stage": 3}}


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["zero_optimization"].update(stage3_param_persistance_threshold=5), "DeepSpeed rejects it"),
    (lambda c: c["optimizer"]["params"].update(lr="0.3"), r"optimizer.params.lr has the wrong type: '0.3'"),
    (lambda c: c["optimizer"].update(type="Adamm"), r"optimizer.type 'Adamm' is not one of"),
    (lambda c: c.update(gradient_clipping="1.0"), "gradient_clipping must be a number"),
    (lambda c: c.update(train_batch_size=True), "train_batch_size must be a positive integer"),
    (lambda c: c["zero_optimization"].update(stage="3"), r"stage must be 0, 1, 2 or 3 \(an integer\), got '3'"),
    (lambda c: c.update(bf16={"enabled": "yes"}), "bf16.enabled must be true or false"),
    (lambda c: c.update(fp16={"enabled": True}), "mT5 overflows in fp16"),
    (lambda c: c.pop("optimizer"), "needs an 'optimizer' section"),
    (lambda c: c.update(scheduler={"type": "Cosine"}), "scheduler.type must be one of"),
])
def test_what_deepspeed_would_misread_is_refused(edit, match):
    cfg = copy.deepcopy(BASE)
    edit(cfg)
    with pytest.raises(ConfigError, match=match):
        resolved, _, _ = dsconfig.resolve(cfg, "ds.json", 1)
        dsconfig.check_with_deepspeed(resolved, "ds.json")


def test_a_typo_fails_the_dry_run_with_one_line(tmp_path, capsys):
    bad = copy.deepcopy(BASE)
    bad["zero_optimization"]["stage3_prefetch_bucket_sise"] = 10
    (tmp_path / "ds.json").write_text(json.dumps(bad))
    assert main(["--ds_config", str(tmp_path / "ds.json"), "--dry_run", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage3_prefetch_bucket_sise" in err[0] and err[0].startswith("error: --ds_config")


def test_found_by_name_or_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: names still resolve
    assert dsconfig.find("zero3_bf16") == dsconfig.find("zero3_bf16.json") == dsconfig.SHIPPED_DIR / "zero3_bf16.json"
    (tmp_path / "zero3_bf16.json").write_text("{}")  # a file of that name here wins: a path is a path
    assert dsconfig.find("zero3_bf16.json") == Path("zero3_bf16.json")
    with pytest.raises(ConfigError, match=r"--ds_config nope: no such file and not a shipped config \(replicated_bf16"):
        dsconfig.find("nope")
    p = tmp_path / "ds.json"
    p.write_text('{\n  "train_batch_size": 8,\n  "optimizer": {,}\n}')
    with pytest.raises(ConfigError, match=r"ds\.json: line 3: invalid JSON"):
        dsconfig.load(str(p))


def test_auto_runs_the_planners_choice(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--dry_run", "--inews_content_chars", "0", "--max_length", "24", "--output_dir",
                 str(tmp_path / "o")]) == 0  # --ds_config auto is the default
    out = capsys.readouterr().out
    assert "parallelism: replicated (ZeRO stage 0), fp32; DeepSpeed JSON replicated_cpu (--ds_config auto: the full " \
           "weights" in out
    assert "batch: global 32 = micro 16 x accum 1 x world 2" in out
