"""ZeRO-3 and replicated data parallelism across 2 ranks (gloo, CPU) against a single process, through the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from softprompt.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
P = 4  # prompt tokens
STEPS = 6


def ds_config(tmp_path, stage: int, lr: float = 0.3) -> str:
    """Global batch 8 of micro-batches of 4: accumulation 1 on 2 ranks, 2 on one rank."""
    cfg = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 100000,
                              "stage3_param_persistence_threshold": 1000},
    }
    path = tmp_path / f"stage{stage}_lr{lr}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def train_args(model_dir, ds, out, **extra):
    args = {"model": model_dir, "ds_config": ds, "output_dir": out, "dataset": "inews",
            "inews_content_chars": 0, "max_length": 24, "prompt_length": P, "prompt_init": "vocab",
            "max_steps": STEPS, "log_every": 1, "eval_every": 3, "eval_batch_size": 64, "seed": 1,
            "quiet": True, **extra}
    return [f"--{k}={v}" if v is not True else f"--{k}" for k, v in args.items()]


def run(cmd, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def deepspeed(script, *args):
    return run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(free_port()), script, *args])


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# Class-weighted: the weights make the loss's normalisation matter, which a split into ranks and
# micro-batches must not change.
WEIGHTED = {"class_weights": "balanced", "select_metric": "macro_f1"}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    one = tmp / "one_rank_no_zero"
    two = tmp / "two_rank_zero3"
    replicated = tmp / "two_rank_replicated"
    (tmp / "started").touch()  # for test_leaves_no_shared_memory_behind
    run([sys.executable, "train.py", *train_args(tiny_model_dir, ds_config(tmp, 0), one, **WEIGHTED)])
    deepspeed("train.py", *train_args(tiny_model_dir, ds_config(tmp, 3), two, **WEIGHTED))
    deepspeed("train.py", *train_args(tiny_model_dir, ds_config(tmp, 0), replicated, **WEIGHTED))
    return one, two, replicated


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["zero3", "replicated"])
def test_two_ranks_match_one_rank(runs, mode):
    one, two = read_metrics(runs[0]), read_metrics(runs[1 if mode == "zero3" else 2])
    loss1 = [r["train/loss"] for r in one if "train/loss" in r]
    loss2 = [r["train/loss"] for r in two if "train/loss" in r]
    assert len(loss1) == len(loss2) == STEPS
    assert loss1[0] > 0.5  # a real cross-entropy over 3 classes, not a constant
    # Same examples per step, different reduction order (gloo reduce-scatter vs local accumulation):
    # agreement to float32 rounding, compounded over the steps.
    assert loss2 == pytest.approx(loss1, rel=1e-4, abs=1e-5)
    assert len(set(round(x, 6) for x in loss1)) > 1, "the prompt should be learning"
    # Eval counts every example exactly once: same confusion matrices, 999 dev examples each time.
    for key in ("eval/confusion", "test/confusion"):
        cm1 = [r[key] for r in one if key in r]
        cm2 = [r[key] for r in two if key in r]
        assert cm1 == cm2 and cm1
        assert all(sum(map(sum, cm)) == 999 for cm in cm1)


@pytest.mark.distributed
def test_outputs_written_by_rank_zero(runs):
    _, two, _ = runs
    assert sorted(p.name for p in two.iterdir() if p.name != ".lock") == [
        "config.yaml", "metrics.jsonl", "prompt.json", "prompt.safetensors", "results.json"]
    results = json.loads((two / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["batch"] == {"global_batch": 8, "micro_batch": 4, "grad_accum": 1, "world_size": 2}
    assert results["ds_config"]["zero_optimization"]["stage"] == 3
    assert results["ds_config"]["gradient_accumulation_steps"] == 1 and results["recipe"]["lr"] == 0.3  # resolved
    assert results["label_names"] == ["0", "1", "2"] and results["verbalizer_ids"] == [[3], [4], [5]]
    assert results["test"]["n"] == 999 and 0 <= results["test"]["accuracy"] <= 1
    # Balanced weights by hand: N / (C x count) from inews train's labels.
    from softprompt.config import DataConfig
    from softprompt.data import load_splits

    train = load_splits(DataConfig(dataset="inews", inews_content_chars=0)).train["label"]
    counts = [train.count(c) for c in range(3)]
    assert results["class_weights"] == pytest.approx([len(train) / (3 * n) for n in counts])
    assert results["class_weights"][0] > 2 > 1 > results["class_weights"][1]  # class 0 is rare
    # The best step is the dev eval with the highest macro-F1 (the first of ties), not accuracy.
    evals = [r for r in read_metrics(two) if "eval/macro_f1" in r]
    assert results["best_step"] == max(evals, key=lambda r: r["eval/macro_f1"])["step"]
    assert results["dev"]["macro_f1"] == max(r["eval/macro_f1"] for r in evals)
    meta = json.loads((two / "prompt.json").read_text())
    assert (meta["n_tokens"], meta["d_model"], meta["init"]) == (P, 32, "vocab")
    assert meta["label_names"] == ["0", "1", "2"] and len(meta["tokenizer_hash"]) == 16
    from safetensors.torch import load_file

    prompt = load_file(two / "prompt.safetensors")["prompt"]
    assert prompt.shape == (P, 32) and str(prompt.dtype) == "torch.float32"
    records = read_metrics(two)
    assert all("step" in r for r in records)
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/samples_per_s"} <= set(records[0])
    assert any("eval/macro_f1" in r for r in records) and any("test/accuracy" in r for r in records)


@pytest.mark.distributed
def test_leaves_no_shared_memory_behind(runs):
    """DeepSpeed's CPU shm all-reduce op leaves a 69 MB /dev/shm buffer per rank after every run
    (docs/architecture.md, traps); dist.init keeps DeepSpeed on plain gloo."""
    started = (runs[0].parent / "started").stat().st_mtime
    leaked = [p.name for p in Path("/dev/shm").glob("deepspeed_*") if p.stat().st_mtime >= started]
    assert not leaked


@pytest.mark.distributed
@pytest.mark.parametrize("method", [{}, {"prompt_depth": "all", "reparam": "residual", "reparam_dim": 8}],
                         ids=["input", "deep+residual"])
def test_inside_zero3(tiny_model_dir, tmp_path, method):
    report = tmp_path / "report.json"
    deepspeed("tests/zero3_checks.py", str(report),
              *train_args(tiny_model_dir, ds_config(tmp_path, 3), tmp_path / "out", max_steps=3, **method))
    r = json.loads(report.read_text())
    assert r["world"] == 2
    assert r["frozen_unchanged"] and r["frozen_names"] > 10
    assert all(r["prompt_changed"].values())  # every trainable tensor moved: the MLP's too
    # Deep: one (P, 32) slice per encoder and decoder layer (2 + 2); the MLP: 32 -> 8 -> 32, LayerNorm(32).
    trainable = 4 * P * 32 + (32 * 8 + 8 + 8 * 32 + 32 + 2 * 32) if method else P * 32
    assert r["optimizer_state_numel"] == 2 * r["prompt_numel"] == 2 * trainable  # AdamW: two moments, prompt only
    # Each rank holds about half of the frozen weights (small tensors below the persistence
    # threshold stay whole on every rank, hence the margin).
    assert sum(r["frozen_per_rank"]) < 0.6 * 2 * r["frozen_full"]
    assert all(0.4 * r["frozen_full"] < n < 0.6 * r["frozen_full"] for n in r["frozen_per_rank"])
    # The transformers-5 trap: lm_head must stay the checkpoint's own, not a copy of `shared`.
    assert r["lm_head_untied"] and r["lm_head_is_checkpoint"] and r["shared_is_checkpoint"]
    assert r["class_head_is_checkpoint_rows"]


@pytest.mark.distributed
@pytest.mark.parametrize("stage, method, lr", [(3, {"prompt_depth": "all"}, 0.03),
                                               (0, {"tune": "full", "prompt_length": 0}, 5e-4)],
                         ids=["zero3-deep-prompts", "replicated-full-tuning"])
def test_activation_checkpointing_changes_no_loss(tiny_model_dir, tmp_path, stage, method, lr):
    """Recomputing each block in the backward gives the same gradients: fp32 losses within 1e-6."""
    runs = {}
    for name, flag in (("plain", {}), ("checkpointed", {"activation_checkpointing": True})):
        out = tmp_path / name
        deepspeed("train.py", *train_args(tiny_model_dir, ds_config(tmp_path, stage, lr), out, max_steps=4,
                                          eval_every=4, **method, **flag))
        runs[name] = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
        assert (json.loads((out / "results.json").read_text())["activation_checkpointing"]) == bool(flag)
    assert len(runs["plain"]) == 4 and len(set(runs["plain"])) > 1
    assert runs["checkpointed"] == pytest.approx(runs["plain"], rel=1e-6, abs=1e-6)
