"""train.py's command line: help for every flag, and bad input -> one line, exit 2, nothing written."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import cli
from launcher.main import main
from softprompt.config import ConfigError, DataConfig, ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for cls in (DataConfig, ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in text
            assert " ".join(f.metadata["help"].split())[:40] in text


def test_flags_map_to_typed_config():
    cfg = cli.parse(["--prompt_length", "7", "--epochs", "1.5", "--quiet", "--text_pair_field", "b",
                     "--local_rank=1"])
    assert cfg.model.prompt_length == 7 and cfg.train.epochs == 1.5 and cfg.train.quiet
    assert cfg.data.text_pair_field == "b" and cfg.data.text_field == "text"


@pytest.fixture
def files(tmp_path):
    """A small valid jsonl dataset; each case below breaks one thing."""
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"text": f"今天股市{'大涨' if i % 2 else '下跌'}第{i}天", "label": "pos" if i % 2 else "neg"}
            for i in range(12)]
    for split in ("train", "dev"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return d


def write_ds(tmp_path, **cfg):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}},
                             "zero_optimization": {"stage": 3}, **cfg}))
    return str(p)


def breaks(case, d: Path, tmp_path, model_dir):
    """Args for one bad-input case (and the file edit it needs)."""
    args = ["--dataset", str(d), "--model", str(model_dir), "--ds_config", write_ds(tmp_path)]
    if case == "missing file":
        (d / "dev.jsonl").unlink()
    elif case == "malformed jsonl":
        with open(d / "train.jsonl", "a") as f:
            f.write('{"text": "坏行", "label": \n')
    elif case == "missing field":
        args += ["--text_field", "sentence"]
    elif case == "empty text":
        with open(d / "dev.jsonl", "a") as f:
            f.write(json.dumps({"text": "   ", "label": "pos"}) + "\n")
    elif case == "unseen label":
        with open(d / "dev.jsonl", "a") as f:
            f.write(json.dumps({"text": "新的", "label": "neutral"}) + "\n")
    elif case == "one class":
        (d / "train.jsonl").write_text(json.dumps({"text": "只有一类", "label": "pos"}) + "\n")
    elif case == "label word empty":
        args += ["--verbalizer_words", "好,\u200b"]
    elif case == "prompt_length":
        args += ["--prompt_length", "0"]
    elif case == "max_length":
        args += ["--max_length", "1"]
    elif case == "unknown model":
        args[3] = str(tmp_path / "no-such-model")
    elif case == "fp16":
        args[5] = write_ds(tmp_path, fp16={"enabled": True})
    elif case == "class_weights":
        args += ["--class_weights", "inverse"]
    elif case == "select_metric":
        args += ["--select_metric", "f1"]
    elif case == "batch triple":
        args[5] = write_ds(tmp_path, train_micro_batch_size_per_gpu=3)
    return args


CASES = {
    "missing file": r"dev",
    "malformed jsonl": r"train\.jsonl:13",
    "missing field": r"train\.jsonl.*'sentence'",
    "empty text": r"dev\.jsonl:13.*'text'",
    "unseen label": r"dev\.jsonl:13.*neutral",
    "one class": r"train\.jsonl.*(2 classes|one class|at least 2)",
    "label word empty": r"tokenizes to nothing",
    "prompt_length": r"--prompt_length must be > 0",
    "max_length": r"--max_length 1 cannot hold any text",
    "unknown model": r"--model .*no-such-model: no such model directory",
    "fp16": r"fp16",
    "batch triple": r"micro-batch 3 does not divide the global batch 4 / world size 1 = 4 per rank: use "
                    r"--micro_batch 1, 2, 4",
    "class_weights": r"--class_weights: invalid choice: 'inverse' \(choose from '?none'?, '?balanced'?\)",
    "select_metric": r"--select_metric: invalid choice: 'f1' \(choose from '?accuracy'?, '?macro_f1'?\)",
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(case, files, tmp_path, tiny_model_dir, capsys):
    out_dir = tmp_path / "out"
    rc = main(breaks(case, files, tmp_path, tiny_model_dir) + ["--output_dir", str(out_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err and err[-1].startswith("error: ")
    import re

    assert re.search(CASES[case], err[-1]), err[-1]
    assert not out_dir.exists()


def test_dry_run_validates_and_writes_nothing(files, tmp_path, tiny_model_dir, capsys):
    out_dir = tmp_path / "out"
    args = ["--dataset", str(files), "--model", str(tiny_model_dir), "--ds_config", write_ds(tmp_path),
            "--verbalizer_words", "差,好", "--dry_run", "--output_dir", str(out_dir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "labels ['neg', 'pos']" in out and "global 4 = micro 4 x accum 1 x world 1" in out
    assert "optimizer AdamW lr 0.1" in out and "parallelism: ZeRO-3, fp32" in out
    assert "schedule: 6 steps (3/epoch), dev eval at steps 3, 6; best by accuracy" in out  # epoch ends
    assert not out_dir.exists()


def test_every_choice_is_listed_once_in_help():
    text = build_help()
    assert text.count("{prompt,full}") == 2 and "--tune {prompt,full}" in text  # usage line + the flag's line
    assert "--quiet, --no-quiet" in text


def build_help() -> str:
    return cli.build_parser().format_help()


def write_yaml(path, text):
    path.write_text(text)
    return str(path)


def test_config_file_gives_defaults_and_flags_override(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", "model:\n  prompt_length: 7\n  prompt_init: labels\ntrain:\n  lr: 0.05\n"
                                          "  quiet: true\n  ds_config: {train_batch_size: auto}\n")
    cfg = cli.parse(["--config", path, "--prompt_length", "9", "--no-quiet"])
    assert (cfg.model.prompt_length, cfg.model.prompt_init, cfg.train.lr) == (9, "labels", 0.05)
    assert cfg.train.quiet is False and cfg.train.ds_config == {"train_batch_size": "auto"}
    assert cli.parse(["--prompt_length", "9", "--config", path]).model.prompt_length == 9  # order does not matter


@pytest.mark.parametrize("text, match", [
    ("model:\n  prompt_lenght: 7\n", r"c\.yaml: model\.prompt_lenght is not a setting"),
    ("modle:\n  x: 1\n", r"unknown section 'modle'"),
    ("model:\n  tune: half\n", r"--tune must be one of prompt, full, got 'half'"),
    ("train:\n  epochs: .nan\n", r"--epochs must be a finite number > 0, got nan"),
    ("model: [1, 2\n", r"c\.yaml:\d+: invalid YAML"),
    ("- 1\n- 2\n", r"expected sections data:, model:, train:"),
])
def test_config_file_errors_name_the_file_and_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        cli.parse(["--config", write_yaml(tmp_path / "c.yaml", text)])
    assert main(["--config", str(tmp_path / "c.yaml"), "--dry_run"]) == 2
