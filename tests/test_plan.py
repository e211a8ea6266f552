"""The memory planner: parameter counts, monotonicity, and its activation formula vs what autograd saves."""

import pytest
import torch

from softprompt import plan
from softprompt.model import PromptedMT5
from softprompt.prompt import SoftPrompt

TOLERANCE = 0.05  # predicted activation bytes within 5% of the measured saved tensors


def test_param_counts_match_the_published_sizes():
    counts = {k: plan.param_count(s) for k, s in plan.MT5.items()}
    assert round(counts["mt5-xl"] / 1e9, 2) == 3.74
    assert round(counts["mt5-xxl"] / 1e9, 2) == 12.92
    assert round(counts["mt5-small"] / 1e6) == 300


def test_config_json_shape_counts_like_the_model(tiny_model_dir):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir)
    assert plan.param_count(plan.resolve_shape(str(tiny_model_dir))) == sum(p.numel() for p in model.parameters())


def plan_for(gpus, **kw):
    args = dict(gpu_mem_gb=80, seq_len=512, prompt_length=100, dtype="bf16", offload=False,
                ds_config={}, headroom_gb=3) | kw
    return plan.make_plan(plan.MT5["mt5-xxl"], gpus, **args)


def test_more_gpus_smaller_shard_and_checkpointing_saves_activations():
    shards = [plan_for(g).fixed["frozen weight shard"] for g in (1, 2, 8, 64)]
    assert shards == sorted(shards, reverse=True) and len(set(shards)) == 4
    p = plan_for(8)
    assert p.per_sample[True] < p.per_sample[False]
    assert p.max_micro_batch(True) > p.max_micro_batch(False) > 0
    assert plan_for(8, offload=True).fixed["frozen weight shard"] == 0
    # frozen-aware: far below DeepSpeed's every-parameter-trained estimate
    assert sum(p.fixed.values()) < p.deepspeed_18b / 4


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activation_formula_matches_measured(tiny_model_dir, dtype):
    from softprompt import loading

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    # The trainer's loader (softprompt.kernels: fused norm, GELU, CPU attention), dropout 0 as the
    # trainer's default: dropout would save masks
    config = loading.load_model_config(str(tiny_model_dir))
    mt5 = loading.load_frozen_model(str(tiny_model_dir), config, torch_dtype)
    d, P, B, T = mt5.config.d_model, 6, 4, 40
    model = PromptedMT5(mt5, SoftPrompt(torch.randn(P, d)), torch.randn(3, d)).train()
    ids = torch.randint(5, mt5.config.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1:, -7:] = 0  # dynamic padding: the SDPA mask becomes per-example
    measured = plan.saved_tensor_bytes(
        model, lambda: torch.nn.functional.cross_entropy(model(ids, mask), torch.tensor([0, 1, 2, 0])))
    shape = plan.resolve_shape(str(tiny_model_dir))
    predicted = plan.activation_bytes(shape, B, P + T, plan.DTYPE_BYTES[dtype], checkpointing=False, gpu=False)
    assert predicted == pytest.approx(measured, rel=TOLERANCE)


def test_cli_prints_and_bad_input_exits_2(capsys):
    assert plan.main(["--model", "mt5-xl", "--gpus", "8", "--micro_batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "3.74B params" in out and "largest micro-batch that fits" in out and "18 B/param" in out
    for argv in (["--model", "mt5-nope"], ["--gpus", "0"], ["--ds_config", "/no/such.json"]):
        assert plan.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
