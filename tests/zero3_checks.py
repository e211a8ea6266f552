"""Run under the deepspeed launcher by tests/test_distributed.py: train a few steps with ZeRO-3 and
report, as JSON, what can only be seen from inside the ranks.

    deepspeed --num_gpus 2 tests/zero3_checks.py REPORT.json <train.py flags>
"""

import json
import sys

import torch
from safetensors import safe_open

from launcher import cli
from launcher import main as launcher_main
from softprompt import engine, metrics, trainer
from softprompt.prompt import gathered, read_state
from softprompt.tracking import Tracker


def frozen_snapshot(model):
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    with gathered([p for _, p in frozen]):
        return {n: p.detach().clone() for n, p in frozen}


def main(report_path, argv):
    cfg = cli.parse(argv)
    v = launcher_main.validate(cfg)
    rank, world = engine.init_distributed()
    eng = launcher_main.build(cfg, v)
    model = eng.module
    mt5 = model.mt5

    before, prompt_before = frozen_snapshot(model), read_state(model.prompt)
    with safe_open(f"{v.model_path}/model.safetensors", "pt") as f:
        saved_head = f.get_tensor("lm_head.weight")
        saved_shared = f.get_tensor("shared.weight")
    with gathered([mt5.lm_head.weight, mt5.shared.weight]):
        head_is_checkpoint = torch.equal(mt5.lm_head.weight, saved_head)
        shared_is_checkpoint = torch.equal(mt5.shared.weight, saved_shared)
    head_rows = torch.stack([saved_head[p].mean(0) for p in v.pieces])

    tracker = Tracker(cfg.train.output_dir, rank == 0, v.schedule.total_steps, quiet=True)
    trainer.train(eng, v.splits, v.sizes, v.schedule, cfg, tracker, v.tokenizer.pad_token_id, rank,
                  engine.device())
    tracker.close()

    after, prompt_after = frozen_snapshot(model), read_state(model.prompt)
    local, full = engine.frozen_numel(model)
    per_rank = torch.zeros(world, dtype=torch.long)
    per_rank[rank] = local
    report = {
        "world": world,
        "frozen_full": full,
        "frozen_per_rank": metrics.all_reduce_sum(per_rank).tolist(),
        "frozen_unchanged": all(torch.equal(before[n], after[n]) for n in before),
        "frozen_names": len(before),
        "prompt_changed": {n: not torch.equal(prompt_before[n], prompt_after[n]) for n in prompt_after},
        "prompt_numel": sum(t.numel() for t in prompt_after.values()),
        "optimizer_state_numel": int(metrics.all_reduce_sum(torch.tensor(engine.optimizer_state_numel(eng)))),
        "lm_head_untied": mt5.lm_head.weight is not mt5.shared.weight,
        "lm_head_is_checkpoint": head_is_checkpoint,
        "shared_is_checkpoint": shared_is_checkpoint,
        "class_head_is_checkpoint_rows": torch.equal(model.head, head_rows),
    }
    if rank == 0:
        with open(report_path, "w") as f:
            json.dump(report, f)
    engine.close_distributed()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1:])
