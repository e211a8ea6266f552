"""Loading the frozen model: local directories, hub ids from the cache without touching the network, a
fast clear error where a hub id is neither cached nor reachable, and the lm_head kept untied."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from softprompt import loading
from softprompt.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_untied_checkpoint_is_detected(tiny_model_dir):
    info = loading.checkpoint_info(loading.model_source(str(tiny_model_dir)))
    assert info.has_lm_head and info.nbytes == (tiny_model_dir / "model.safetensors").stat().st_size


def test_unknown_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--model .*nope: no such model directory"):
        loading.model_source(str(tmp_path / "nope"))


def hub_cache(tmp_path, model_dir, repo="google/mt5-test"):
    """An HF hub cache holding `repo` as huggingface_hub lays it out (refs/main -> snapshots/<rev>/files)."""
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    rev = "0" * 40
    shutil.copytree(model_dir, root / "snapshots" / rev)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    return tmp_path / "hub"


def python(code, env, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    env.pop("HF_HUB_OFFLINE", None)  # the tests' conftest sets it: these runs decide without it
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


# A hub endpoint that refuses at once; an unreachable one is covered by the probe's 3 s timeout.
NO_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9"}


def test_a_cached_hub_id_loads_without_the_network(tmp_path, tiny_model_dir):
    cache = hub_cache(tmp_path, tiny_model_dir)
    code = ("import time, torch; from softprompt import loading; t = time.time(); "
            "s = loading.model_source('google/mt5-test'); c = loading.load_model_config(s); "
            "m = loading.load_frozen_model(s, c); loading.load_tokenizer(s); "
            "print(s.local_files_only, type(m).__name__, m.lm_head.weight is not m.shared.weight, round(time.time() - t))")
    proc = python(code, {**NO_HUB, "HF_HUB_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    local, cls, untied, seconds = proc.stdout.split()
    assert local == "True" and cls == "MT5ForConditionalGeneration" and untied == "True"
    assert int(seconds) < 20  # no network retries


def test_a_hub_id_neither_cached_nor_reachable_fails_fast(tmp_path):
    code = "from softprompt import loading; loading.model_source('google/mt5-xl')"
    t = time.monotonic()
    proc = python(code, {**NO_HUB, "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert time.monotonic() - t < 30
    assert "--model google/mt5-xl: not in the local cache" in proc.stderr and "is unreachable" in proc.stderr
    proc = python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")} | NO_HUB)
    assert "HF_HUB_OFFLINE is set" in proc.stderr or "is unreachable" in proc.stderr


def test_train_py_turns_off_the_safetensors_conversion_thread():
    code = ("import os; from launcher.main import main; main(['--help']) if False else None; "
            "from softprompt.loading import environment_defaults; environment_defaults(); "
            "print(os.environ['DISABLE_SAFETENSORS_CONVERSION'])")
    assert python(code, {}).stdout.strip() == "1"


def test_activation_checkpointing_is_switched_on_per_block(tiny_model_dir):
    config = loading.load_model_config(str(tiny_model_dir))
    model = loading.load_frozen_model(str(tiny_model_dir), config, torch.float32, activation_checkpointing=True)
    blocks = [*model.encoder.block, *model.decoder.block]
    assert all(b.gradient_checkpointing for b in blocks)
    assert not any(p.requires_grad for p in model.parameters())
