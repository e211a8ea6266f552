"""softprompt: soft prompt tuning of frozen T5/mT5 models under DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
