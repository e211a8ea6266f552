"""The memory planner: shapes and parameter counts, the activation formulas against measured tensors
(with and without activation checkpointing), the parallel-mode recommendation and its command line."""

import shlex

import pytest
import torch

from softprompt import memory, plan
from softprompt.model import PromptedMT5
from softprompt.prompt import SoftPrompt

HELD_TOLERANCE = 0.04  # predicted held activations within 4% of the measured (either side)
PEAK_MARGIN = 0.25  # predicted peak at least the measured peak, at most 25% above it


def test_param_counts_match_the_published_sizes():
    counts = {k: plan.param_count(s) for k, s in plan.MT5.items()}
    assert round(counts["mt5-xl"] / 1e9, 2) == 3.74
    assert round(counts["mt5-xxl"] / 1e9, 2) == 12.92
    assert round(counts["mt5-small"] / 1e6) == 300


def test_shapes_from_a_config_file_and_a_live_config_count_like_the_model(tiny_model_dir):
    from transformers import AutoModelForSeq2SeqLM, MT5Config

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir)
    from_file = plan.resolve_shape(str(tiny_model_dir))
    assert memory.shape_from_hf_config(model.config, from_file.name) == from_file
    assert memory.shape_from_hf_config(model.config, from_file.name, tied=True).tied
    assert plan.param_count(from_file) == sum(p.numel() for p in model.parameters())
    xl = MT5Config(vocab_size=250112, d_model=2048, d_ff=5120, num_layers=24, num_heads=32, d_kv=64,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    assert memory.shape_from_hf_config(xl, "mt5-xl") == plan.MT5["mt5-xl"]


def test_bf16_load_keeps_wo_and_the_residual_stream_in_bf16(tiny_model_dir):
    """`_keep_in_fp32_modules = ["wo"]` applies to fp16 loads only: the norms read bf16 in bf16."""
    from softprompt import loading

    config = loading.load_model_config(str(tiny_model_dir))
    mt5 = loading.load_frozen_model(str(tiny_model_dir), config, torch.bfloat16)
    assert {p.dtype for p in mt5.parameters()} == {torch.bfloat16}
    seen = []
    mt5.encoder.block[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    mt5.encoder(input_ids=torch.tensor([[5, 6, 7]]))
    assert seen == [torch.bfloat16]
    half = loading.load_frozen_model(str(tiny_model_dir), config, torch.float16)
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # the fp16 rule


def plan_for(gpus, mode="zero3", **kw):
    args = dict(gpu_mem_gb=80, seq_len=512, prompt_length=100, dtype="bf16", mode=mode, ds_config={},
                headroom_gb=3) | kw
    return plan.make_plan(plan.MT5["mt5-xxl"], gpus, **args)


def test_modes_budget_the_weights_and_checkpointing_saves_activations():
    params = plan.param_count(plan.MT5["mt5-xxl"])
    assert plan_for(8, "replicated").fixed["frozen weights (full copy)"] == params * 2  # lm_head included
    assert "gathered transient: shared embedding" not in plan_for(8, "replicated").fixed
    shards = [plan_for(g).fixed["frozen weight shard"] for g in (1, 2, 8, 64)]
    assert shards == [params * 2 / g for g in (1, 2, 8, 64)]
    assert plan_for(8, "zero3_offload").fixed["frozen weight shard"] == 0
    p = plan_for(8)
    assert p.per_sample(True) < p.per_sample(False)
    assert p.max_micro_batch(True) > p.max_micro_batch(False) > 0
    for ckpt in (False, True):  # the largest micro-batch is exactly the last that fits
        m = p.max_micro_batch(ckpt)
        assert p.total(m, ckpt) <= p.capacity < p.total(m + 1, ckpt)
    assert sum(p.fixed.values()) < plan.deepspeed_all_trained(p.params, 250112 * 4096, 8, False) / 4


def step_of(tiny_model_dir, dtype, checkpointing, depth):
    """The trainer's model (kernels.fuse, dropout 0) with a prompt, and a loss step on padded inputs."""
    from softprompt import loading

    config = loading.load_model_config(str(tiny_model_dir))
    # As train.py loads it, --activation_checkpointing included (every encoder and decoder block).
    mt5 = loading.load_frozen_model(str(tiny_model_dir), config, dtype, activation_checkpointing=checkpointing)
    d, P, B, T = config.d_model, 6, 4, 40
    layers = {"input": 1, "all": config.num_layers + config.num_decoder_layers}[depth]
    model = PromptedMT5(mt5, SoftPrompt(torch.randn(layers, P, d)), torch.randn(3, d)).train()
    ids = torch.randint(5, config.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1:, -7:] = 0  # dynamic padding: the attention mask becomes per-example
    labels = torch.tensor([0, 1, 2, 0])
    return model, lambda: torch.nn.functional.cross_entropy(model(ids, mask), labels), B, P + T, (
        P + 1 if depth == "all" else 1)


@pytest.mark.parametrize("depth", ["input", "all"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "ckpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_formulas_match_measured_tensors(tiny_model_dir, dtype, checkpointing, depth):
    """Held: the tensors the forward leaves alive for the backward (saved tensors, and the block
    inputs checkpointing keeps for its recomputation). Peak: the most tensor bytes alive at once over
    forward and backward (recomputed blocks, gradients, temporaries), what the allocator must hold."""
    torch.manual_seed(0)
    model, step, B, L, Q = step_of(tiny_model_dir, dtype, checkpointing, depth)
    held, peak = memory.live_tensor_bytes(step)
    shape = plan.resolve_shape(str(tiny_model_dir))
    b = plan.DTYPE_BYTES["bf16" if dtype == torch.bfloat16 else "fp32"]
    predicted = memory.activations(shape, L, b, checkpointing, gpu=False, dec_tokens=Q)
    assert predicted.held_bytes(B) == pytest.approx(held, rel=HELD_TOLERANCE)
    assert peak <= predicted.peak_bytes(B) <= peak * (1 + PEAK_MARGIN)
    if not checkpointing:  # without checkpointing what is held is exactly what autograd saves
        model.zero_grad(set_to_none=True)
        assert plan.saved_tensor_bytes(model, step) == pytest.approx(held, rel=0.01)


def rec(model, gpus=8, mem=80, nodes=1, **kw):
    return plan.recommend(plan.MT5[model], gpus, nodes, mem, 512, 100, **kw)


def test_recommendation_boundaries():
    # mt5-xl on 8 x 80 GB: 3.74e9 x 2 B = 6.97 GiB of weights leave ~70 GiB for activations
    xl = rec("mt5-xl")
    assert (xl.mode, xl.config, xl.activation_checkpointing) == ("replicated", "replicated_bf16", False)
    assert xl.micro_batch >= 8 and xl.gib_per_gpu <= 77
    # mt5-xxl on 8 x 24 GB: 12.92e9 x 2 B = 24.1 GiB of weights alone exceed the 21 usable: ZeRO-3,
    # whose shard (3.0 GiB) + gathered embedding (1.9) + buckets leave room for samples
    xxl = rec("mt5-xxl", mem=24)
    assert plan.param_count(plan.MT5["mt5-xxl"]) * 2 / 2**30 > 21
    assert (xxl.mode, xxl.config, xxl.activation_checkpointing) == ("zero3", "zero3_bf16", False)
    assert xxl.micro_batch >= 1 and "replicated does not fit" in xxl.reason
    # ZeRO-3's fixed bytes exceed the card: the weights go to CPU memory
    off = rec("mt5-xxl", mem=7.5)
    assert off.mode == "zero3_offload" and off.config == "zero3_bf16_offload"
    with pytest.raises(plan.PlanError, match="fits in no mode"):
        rec("mt5-xxl", mem=3.5)


def test_checkpointing_is_chosen_only_when_it_is_what_makes_micro_batch_1_fit():
    s = plan.MT5["mt5-xl"]
    p = plan.make_plan(s, 8, 80, 512, 100, "bf16", "replicated", {}, 3.0)
    without, with_ = p.total(1, False) / 2**30, p.total(1, True) / 2**30
    assert with_ < without
    between = 3.0 + (without + with_) / 2  # a card where micro-batch 1 fits only with checkpointing
    r = rec("mt5-xl", mem=between)
    tight = plan.make_plan(s, 8, between, 512, 100, "bf16", "replicated", {}, 3.0)
    assert tight.max_micro_batch(False) == 0 and r.micro_batch == tight.max_micro_batch(True) >= 1
    assert (r.mode, r.activation_checkpointing) == ("replicated", True)
    assert "activation checkpointing" in r.reason and "--activation_checkpointing" in r.command("google/mt5-xl")
    assert rec("mt5-xl", mem=3.0 + without + 0.01).activation_checkpointing is False


def test_global_batch_micro_batch_divides_its_share():
    r = rec("mt5-xl", global_batch=8 * 12)
    assert 12 % r.micro_batch == 0 and r.micro_batch == 12  # 12 fit: no accumulation needed
    r = rec("mt5-xl", global_batch=8 * 1000)
    assert 1000 % r.micro_batch == 0 and r.micro_batch <= rec("mt5-xl").micro_batch
    with pytest.raises(plan.PlanError, match="multiple of 8 GPUs"):
        rec("mt5-xl", global_batch=12)


def test_cpu_hosts_share_host_memory_between_ranks():
    small = plan.recommend_cpu(plan.MT5["mt5-small"], 2, 1, 24, 128, 20)
    assert (small.mode, small.config) == ("replicated", "replicated_cpu")
    # mt5-xl in fp32 is 13.9 GiB: two full copies do not fit a 24 GiB host, shards do
    xl = plan.recommend_cpu(plan.MT5["mt5-xl"], 2, 1, 24, 128, 20)
    assert plan.param_count(plan.MT5["mt5-xl"]) * 4 / 2**30 > plan.cpu_rank_gb(24, 2.0, 2)
    assert (xl.mode, xl.config) == ("zero3", "zero3_cpu")


def test_command_lines_parse_with_train_py_flags():
    from launcher.cli import build_parser

    r = rec("mt5-xxl", mem=24, nodes=2, global_batch=64)
    argv = shlex.split(r.command("google/mt5-xxl"))
    assert argv[:8] == ["deepspeed", "--num_nodes", "2", "--num_gpus", "8", "--hostfile", "hosts", "train.py"]
    ns, unknown = build_parser().parse_known_args(argv[8:])
    assert (ns.model, ns.ds_config, ns.max_length, ns.prompt_length) == (
        "google/mt5-xxl", "zero3_bf16", 512, 100)
    assert not unknown
    assert f"--micro_batch {r.micro_batch}" in " ".join(argv)
    single = shlex.split(rec("mt5-xl").command("google/mt5-xl"))
    assert single[:4] == ["deepspeed", "--num_gpus", "8", "train.py"]
    sb = shlex.split(r.sbatch("google/mt5-xxl"))
    assert sb[:5] == ["sbatch", "-N", "2", "--gpus-per-node=8", "slurm/train.sbatch"] and sb[5:] == argv[8:]


def test_cli_prints_a_recommendation_and_bad_input_exits_2(capsys):
    assert plan.main(["--model", "mt5-xl", "--gpus", "8", "--gpu_mem_gb", "80", "--seq_len", "512",
                      "--prompt_length", "100"]) == 0
    out = capsys.readouterr().out
    assert "3.74B params" in out and "largest micro-batch that fits" in out and "18 B/param" in out
    last = out.strip().splitlines()
    assert last[-4].startswith("Recommendation: replicated, micro-batch ")
    assert last[-2].strip() == rec("mt5-xl").command("google/mt5-xl")
    assert plan.main(["--model", "mt5-xxl", "--gpu_mem_gb", "3.5"]) == 1  # nothing fits: said, not exit 0
    assert "Recommendation: none" in capsys.readouterr().out
    for argv in (["--model", "mt5-nope"], ["--gpus", "0"], ["--ds_config", "/no/such.json"],
                 ["--gpus", "8", "--nodes", "3"], ["--global_batch", "12"], ["--host_mem_gb", "24", "--dtype", "bf16"],
                 ["--mode", "replicated", "--offload"], ["--dtype", "fp32", "--mode", "zero3_offload"]):
        assert plan.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


def test_help_names_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--gpu_mem_gb", "--host_mem_gb", "--global_batch", "--mode", "--offload", "--prompt_depth"):
        assert flag in out
