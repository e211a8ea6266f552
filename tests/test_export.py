"""PEFT interop (softprompt/export.py) against PEFT itself, and predict's input checks.

Oracle: HF PEFT 0.x's `PeftModel.from_pretrained` on a plain `from_pretrained` base model, and an
adapter that PEFT wrote itself (`get_peft_model(...).save_pretrained`)."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from softprompt import checkpoint, export, predict, verbalizer
from softprompt.config import ConfigError
from softprompt.collate import collate
from softprompt.model import PromptedMT5
from softprompt.prompt import SoftPrompt, init_prompt
from softprompt.tokenize import encode, tokenizer_hash
from test_distributed import ROOT, free_port, train_args

P = 4  # prompt tokens, as train_args
PIECES = [[3], [4], [5]]  # the trainer's default verbalizer for inews' labels 0, 1, 2
TEXTS = ["央行宣布降准，股市大涨", "今天天气不错", "公司亏损严重，股价暴跌，投资者损失惨重", "新品发布会",
         "球队昨晚逆转取胜", "暴雨导致多地停课", "新款手机销量创新高", "专家解读最新政策"]


def cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def error_line(err: str) -> str:
    """The one error line a refused command prints (library warnings may precede it)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


def plain_base(model_dir):
    """The base model as a PEFT user loads it: HF's modules, none of softprompt.kernels."""
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).eval()


def batch(tokenizer, max_length=128):
    ids = encode(tokenizer, TEXTS, None, max_length)
    return collate([{"input_ids": x, "label": 0} for x in ids], tokenizer.pad_token_id)


def peft_scores(peft_model, b, pieces=PIECES):
    """PEFT's logits of the verbalizer tokens at the first decoder step, (B, C)."""
    start = torch.full((len(b), 1), peft_model.config.decoder_start_token_id)
    with torch.no_grad():
        logits = peft_model(input_ids=b.input_ids, attention_mask=b.attention_mask, decoder_input_ids=start).logits
    return verbalizer.scores_from_logits(logits[:, 0], pieces)


def our_scores(mt5, values, b):
    with torch.no_grad():
        model = PromptedMT5(mt5, SoftPrompt(values), verbalizer.class_head(mt5.lm_head.weight, PIECES)).eval()
        return model(b.input_ids, b.attention_mask)


@pytest.fixture(scope="module")
def made(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """An untrained input prompt saved as a run saves it, exported through the CLI, and an input file."""
    tmp = tmp_path_factory.mktemp("export")
    soft = SoftPrompt(init_prompt("random", P, torch.nn.Embedding(1, 32), seed=3))  # random init: d_model only
    values = soft.values().detach()[0]  # (P, D)
    meta = {"model": str(tiny_model_dir), "init": "random", "depth": "input", "label_names": ["0", "1", "2"],
            "verbalizer_ids": PIECES, "tokenizer_hash": tokenizer_hash(tiny_tokenizer), "max_length": 24}
    checkpoint.save_prompt(tmp / "run", values, meta)
    cli("-m", "softprompt.export", "--format", "peft", tmp / "run", tmp / "adapter")
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS))
    return tmp, values, tmp / "run", tmp / "adapter", data


def test_adapter_files_match_what_peft_writes(made, tiny_model_dir):
    from peft import PromptTuningConfig, get_peft_model

    _, values, run, adapter, _ = made
    ours = json.loads((adapter / "adapter_config.json").read_text())
    peft_dir = adapter.parent / "peft_written"
    get_peft_model(plain_base(tiny_model_dir), PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, num_transformer_submodules=1)).save_pretrained(peft_dir)
    theirs = json.loads((peft_dir / "adapter_config.json").read_text())
    theirs.pop("peft_version")  # PEFT fills it in when it loads the config
    assert ours == {**theirs, "base_model_name_or_path": str(tiny_model_dir)}
    assert ours["num_attention_heads"] == 2 and ours["num_layers"] == 2 and ours["token_dim"] == 32
    weights = load_file(adapter / "adapter_model.safetensors")
    assert list(weights) == list(load_file(peft_dir / "adapter_model.safetensors")) == ["prompt_embeddings"]
    assert torch.equal(weights["prompt_embeddings"], values)
    assert json.loads((adapter / "prompt.json").read_text()) == json.loads((run / "prompt.json").read_text())


def test_peft_loads_the_adapter_and_scores_exactly_like_ours(made, tiny_model_dir, tiny_tokenizer, tiny_frozen):
    from peft import PeftModel

    _, values, _, adapter, _ = made
    peft_model = PeftModel.from_pretrained(plain_base(tiny_model_dir), str(adapter)).eval()
    assert peft_model.peft_config["default"].num_transformer_submodules == 1
    b = batch(tiny_tokenizer)
    ref = peft_scores(peft_model, b)  # (B, C)
    # The same HF modules on both sides: bit-identical.
    assert (our_scores(plain_base(tiny_model_dir), values, b) - ref).abs().max().item() == 0.0
    # The trainer's model (softprompt.kernels' fused GELU and CPU attention): same functions, other rounding;
    # measured 6.6e-7.
    assert (our_scores(tiny_frozen, values, b) - ref).abs().max().item() < 1e-5


def test_predict_on_the_adapter_equals_the_prompt_file(made, tiny_model_dir):
    tmp, values, run, adapter, data = made
    for name, prompt in (("file", run / "prompt.safetensors"), ("adapter", adapter)):
        cli("-m", "softprompt.predict", "--model", tiny_model_dir, "--prompt", f"t={prompt}", "--input", data,
            "--output", tmp / f"{name}.jsonl")
    assert (tmp / "adapter.jsonl").read_text() == (tmp / "file.jsonl").read_text()
    assert len((tmp / "file.jsonl").read_text().splitlines()) == len(TEXTS)
    for path in (adapter, adapter / "adapter_model.safetensors"):
        got, meta = export.read_prompt(path, "--prompt", 32)
        assert torch.equal(got, values) and meta["label_names"] == ["0", "1", "2"]


def test_foreign_peft_adapter(tmp_path, tiny_model_dir, tiny_tokenizer):
    """An adapter PEFT wrote with its seq2seq default (num_transformer_submodules 2, a 2P-row table of which
    PEFT's forward uses the first P) and no prompt.json: predict needs the classes, then gives PEFT's scores."""
    from peft import PromptTuningConfig, get_peft_model

    peft_model = get_peft_model(plain_base(tiny_model_dir), PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)).eval()
    table = peft_model.prompt_encoder["default"].embedding.weight
    assert table.shape == (2 * P, 32)
    with torch.no_grad():
        table.copy_(torch.randn(2 * P, 32, generator=torch.Generator().manual_seed(0)))
    peft_model.save_pretrained(tmp_path / "foreign")
    got, meta = export.read_prompt(tmp_path / "foreign", "--init_prompt", 32)
    assert torch.equal(got, table[:P].detach()) and meta == {}

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS))
    args = ["--model", tiny_model_dir, "--prompt", tmp_path / "foreign", "--input", data, "--output",
            tmp_path / "preds.jsonl"]
    proc = cli("-m", "softprompt.predict", *args, check=False)
    assert proc.returncode == 2 and "give --labels" in error_line(proc.stderr)
    cli("-m", "softprompt.predict", *args, "--labels", "a,b,c", "--verbalizer_ids", "3,4,5")
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    expected = peft_scores(peft_model, batch(tiny_tokenizer)).softmax(-1)  # (B, C)
    assert [p["task"] for p in preds] == ["foreign"] * len(TEXTS)
    assert [p["label"] for p in preds] == ["abc"[i] for i in expected.argmax(-1).tolist()]
    for p, e in zip(preds, expected.tolist()):
        assert list(p["probs"].values()) == pytest.approx(e, abs=2e-6)  # 6 decimals, fused kernels


@pytest.mark.distributed
def test_init_prompt_from_the_adapter_on_two_ranks(made, tiny_model_dir):
    """export -> --init_prompt ADAPTER_DIR under ZeRO-3 on 2 ranks. A learning rate far below fp32's
    resolution of the prompt's values leaves the prompt bit-equal to what --init_prompt loaded, so the
    run's saved prompt is that tensor."""
    tmp, values, _, adapter, _ = made
    ds = tmp / "tiny_lr.json"
    ds.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4,
                              "optimizer": {"type": "AdamW", "params": {"lr": 1e-30, "torch_adam": True}},
                              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000}}))
    out = tmp / "trained"
    cli("-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port(), "train.py",
        *train_args(tiny_model_dir, ds, out, max_steps=2, eval_every=2, init_prompt=adapter))
    got, meta = checkpoint.load_prompt(out / "prompt.safetensors")
    assert torch.equal(got, values) and meta["label_names"] == ["0", "1", "2"]


def test_refusals_one_line(made, tmp_path, capsys):
    tmp, values, run, adapter, _ = made
    _, meta = checkpoint.load_prompt(run / "prompt.safetensors")
    checkpoint.save_prompt(tmp_path / "deep", torch.zeros(4, P, 32), {**meta, "depth": "all"})
    assert export.main(["--format", "peft", str(tmp_path / "deep"), str(tmp_path / "out")]) == 2
    assert "deep prompt (depth all, 4 layers) has no PEFT equivalent" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()

    def broken(name, config=None, weights=None):
        shutil.copytree(adapter, tmp_path / name)
        if config:
            cfg = json.loads((adapter / "adapter_config.json").read_text())
            (tmp_path / name / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
        if weights is not None:
            save_file({"prompt_embeddings": weights}, tmp_path / name / "adapter_model.safetensors")
        return tmp_path / name

    cases = [(broken("lora", {"peft_type": "LORA"}), "a PEFT LORA adapter for SEQ_2_SEQ_LM"),
             (broken("wide", {"token_dim": 64}), "token_dim 64 does not match the model's d_model 32"),
             (broken("short", weights=values[:2].contiguous()), "prompt_embeddings has shape (2, 32)"),
             (broken("nan", weights=values.clone().index_fill_(0, torch.tensor([1]), float("nan"))),
              "the prompt has 32 NaN/Inf values")]
    for path, message in cases:
        with pytest.raises(ConfigError, match="^--init_prompt .*" + re.escape(message)):
            export.read_prompt(path, "--init_prompt", 32)


# predict's input checks: each refused with one line and exit 2 before anything is written or loaded.

def predict_args(made, model_dir, **override):
    tmp, _, run, _, data = made
    args = {"--model": model_dir, "--prompt": run / "prompt.safetensors", "--input": data,
            "--output": tmp / "never.jsonl", **override}
    return [str(x) for kv in args.items() for x in kv]


def refused(argv, capsys) -> str:
    assert predict.main(argv) == 2
    return error_line(capsys.readouterr().err)


def test_predict_output_is_not_the_input(made, tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = made[4]
    before = data.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(data)
    os.link(data, tmp_path / "hard.jsonl")
    monkeypatch.chdir(data.parent)
    for output in (data, tmp_path / "link.jsonl", tmp_path / "hard.jsonl", "data.jsonl", "./x/../data.jsonl"):
        assert "is the --input file" in refused(predict_args(made, tiny_model_dir, **{"--output": output}), capsys)
        assert data.read_bytes() == before


@pytest.mark.parametrize("flag,value,message", [
    ("--batch_size", "0", "argument --batch_size: must be >= 1, got 0"),
    ("--batch_size", "-1", "argument --batch_size: must be >= 1, got -1"),
    ("--max_length", "0", "argument --max_length: must be >= 1, got 0"),
    ("--output", ".", "is a directory"),
])
def test_predict_bad_flag(made, tiny_model_dir, capsys, flag, value, message):
    out = made[0] / "never.jsonl"
    assert message in refused(predict_args(made, tiny_model_dir, **{flag: value}), capsys)
    assert not out.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_predict_refuses_a_non_finite_prompt(made, tiny_model_dir, tmp_path, capsys, bad):
    values, run = made[1], made[2]
    _, meta = checkpoint.load_prompt(run / "prompt.safetensors")
    (tmp_path / "p").mkdir()  # save_prompt refuses non-finite values, so the file is written by hand
    save_file({"prompt": values.clone().index_fill_(1, torch.tensor([5]), bad)}, tmp_path / "p" / "prompt.safetensors")
    (tmp_path / "p" / "prompt.json").write_text(json.dumps(meta))
    line = refused(predict_args(made, tiny_model_dir, **{"--prompt": tmp_path / "p" / "prompt.safetensors"}), capsys)
    assert line.endswith("the prompt has 4 NaN/Inf values (a diverged run?)")


def test_predict_never_writes_nan(made, tiny_model_dir, tmp_path):
    """A model whose weights give NaN class scores from a finite prompt: one line, exit 1, no output
    (JSON has no NaN)."""
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["lm_head.weight"][PIECES[0][0], 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    proc = cli("-m", "softprompt.predict", *predict_args(made, broken, **{"--output": tmp_path / "p.jsonl"}),
               check=False)
    assert proc.returncode == 1 and "the class probabilities are NaN/Inf" in error_line(proc.stderr), proc.stderr
    assert f"{made[4]}:1:" in error_line(proc.stderr) and not (tmp_path / "p.jsonl").exists()


def test_predict_help_shows_each_default_once():
    parser = predict.build_parser()
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or action.dest == "help":
            continue
        shown = " ".join(formatter._expand_help(action).split())  # what --help prints for the flag
        assert shown in text and shown.count("default") <= 1, shown
        if action.default is not None:
            assert f"(default: {action.default})" in shown, shown
