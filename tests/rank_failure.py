"""Run under the deepspeed launcher by tests/test_recipe.py: a training run through the library's `recipe.run`
whose rank 1 fails at its third training micro-batch, by raising or by stopping itself (SIGSTOP), to see
how the failure is reported and how fast the run ends.

    deepspeed --num_gpus 2 tests/rank_failure.py raise|stop <train.py flags>
"""

import os
import signal
import sys

from launcher import cli
from softprompt import recipe, trainer


def main(mode: str, argv: list[str]) -> int:
    cfg = cli.parse(argv)
    batch, calls = trainer.TokenTable.batch, []

    def failing_batch(table, idx, pad_id):
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 3:
            if mode == "raise":
                raise ValueError("boom on rank 1")
            os.kill(os.getpid(), signal.SIGSTOP)
        return batch(table, idx, pad_id)

    trainer.TokenTable.batch = failing_batch
    return recipe.run(cfg)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(main(args[0], args[1:]))
