"""The shipped DeepSpeed JSON files, installed as package data (`softprompt.ds_configs`) so that
`--ds_config NAME` finds them from any directory."""
