"""train.py's entry point: parse the flags, run the recipe (softprompt/recipe.py), return its exit code."""

from __future__ import annotations

import sys
import warnings

from softprompt import dist, preemption, recipe
from softprompt.config import ConfigError
from softprompt.loading import environment_defaults

from . import cli


def quiet_libraries() -> None:
    """Keep the console for our own progress: library progress bars on rank 0 only, no noise."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not dist.is_main_process():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    preemption.install()
    environment_defaults()
    quiet_libraries()
    try:
        cfg = cli.parse(argv)
    except ConfigError as e:
        if dist.is_main_process():
            print(f"error: {e}", file=sys.stderr)
        return recipe.EXIT_CONFIG_ERROR
    return recipe.run(cfg)


if __name__ == "__main__":
    sys.exit(main())
