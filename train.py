"""Entry point: `deepspeed train.py --ds_config ds_configs/zero3_cpu.json ...` or `python train.py ...`."""

import sys

from launcher.main import main

if __name__ == "__main__":
    sys.exit(main())
