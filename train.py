"""Entry point: `deepspeed train.py ...` or `python train.py ...` (the same as `softprompt-train ...`)."""

import sys

from softprompt import preemption

preemption.install()  # before the imports below, which take seconds: a SIGTERM meanwhile is not lost

from launcher.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
