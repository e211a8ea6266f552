"""Run under the deepspeed launcher by tests/test_distributed.py: train a few steps with ZeRO-3 through the
library's run object (no launcher code) and report, as JSON, what can only be seen from inside the ranks.

    deepspeed --num_gpus 2 tests/zero3_checks.py REPORT.json <train.py flags>
"""

import json
import sys

import torch
from safetensors import safe_open

from launcher import cli
from softprompt import dist, engine
from softprompt.prompt import gathered, read_state
from softprompt.recipe import TrainRecipe


def frozen_snapshot(model):
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    with gathered([p for _, p in frozen]):
        return {n: p.detach().clone() for n, p in frozen}


def main(report_path, argv):
    recipe = TrainRecipe(cli.parse(argv))
    recipe.setup()
    v, eng, rank, world = recipe.inputs, recipe.engine, recipe.rank, recipe.world
    model = eng.module
    mt5 = model.mt5

    before, prompt_before = frozen_snapshot(model), read_state(model.prompt)
    with safe_open(f"{v.source.path}/model.safetensors", "pt") as f:
        saved_head = f.get_tensor("lm_head.weight")
        saved_shared = f.get_tensor("shared.weight")
    with gathered([mt5.lm_head.weight, mt5.shared.weight]):
        head_is_checkpoint = torch.equal(mt5.lm_head.weight, saved_head)
        shared_is_checkpoint = torch.equal(mt5.shared.weight, saved_shared)
    head_rows = torch.stack([saved_head[p].mean(0) for p in v.pieces])
    recipe.train()

    after, prompt_after = frozen_snapshot(model), read_state(model.prompt)
    local, full = engine.frozen_numel(model)
    per_rank = torch.zeros(world, dtype=torch.long)
    per_rank[rank] = local
    report = {
        "world": world,
        "frozen_full": full,
        "frozen_per_rank": dist.all_reduce_sum(per_rank).tolist(),
        "frozen_unchanged": all(torch.equal(before[n], after[n]) for n in before),
        "frozen_names": len(before),
        "prompt_changed": {n: not torch.equal(prompt_before[n], prompt_after[n]) for n in prompt_after},
        "prompt_numel": sum(t.numel() for t in prompt_after.values()),
        "optimizer_state_numel": int(dist.all_reduce_sum(torch.tensor(engine.optimizer_state_numel(eng)))),
        "lm_head_untied": mt5.lm_head.weight is not mt5.shared.weight,
        "lm_head_is_checkpoint": head_is_checkpoint,
        "shared_is_checkpoint": shared_is_checkpoint,
        "class_head_is_checkpoint_rows": torch.equal(model.head, head_rows),
    }
    if rank == 0:
        with open(report_path, "w") as f:
            json.dump(report, f)
    recipe.close()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1:])
