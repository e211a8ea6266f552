"""A run as a whole: reproducible from its config.yaml, one run per output directory, no silent NaN, and a
failure on any rank reported truthfully and fast."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from softprompt.config import ConfigError
from softprompt.rundir import Lock
from test_distributed import ROOT, ds_config, free_port, read_metrics, train_args

FAST = {"max_steps": 4, "eval_every": 2}


def losses(out):
    return [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]


def train(*args, cwd=ROOT, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_config_yaml_repeats_the_run_from_another_directory(tiny_model_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train(*train_args(tiny_model_dir, "zero3_cpu", first, **FAST))  # a shipped config by name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    train("--config", first / "config.yaml", "--output_dir", second, cwd=elsewhere)
    assert losses(second) == losses(first) and len(losses(first)) == 4
    a, b = ((d / "config.yaml").read_text() for d in (first, second))
    assert a.replace(str(first), str(second)) == b  # the same settings, resolved the same way
    assert "ds_config:\n    train_batch_size: auto" in a and "global_batch: 32" in a and "lr: 0.3" in a
    # Flags after --config override it; a changed setting changes the run.
    third = tmp_path / "third"
    train("--config", first / "config.yaml", "--output_dir", third, "--seed", "2", cwd=elsewhere)
    assert losses(third) != losses(first)


def test_an_output_dir_holds_one_run(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = train_args(tiny_model_dir, ds_config(tmp_path, 0), out, max_steps=2, eval_every=2)
    train(*args)
    proc = train(*args, check=False)
    assert proc.returncode == 2 and f"--output_dir {out} holds a run (config.yaml, metrics.jsonl" in proc.stderr
    assert len(read_metrics(out)) > 0  # untouched
    proc = train(*args, "--resume", "auto", check=False)
    assert proc.returncode == 2 and "that run has finished" in proc.stderr
    before = (out / "results.json").stat().st_mtime_ns
    train(*args, "--overwrite")
    assert (out / "results.json").stat().st_mtime_ns > before
    assert [r["step"] for r in read_metrics(out) if "train/loss" in r] == [1, 2]  # one run's records, not two


def test_a_live_run_locks_its_output_dir(tmp_path):
    lock = Lock(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"--output_dir {tmp_path} is in use by a live run \(pid {os.getpid()}"):
        Lock(str(tmp_path))
    lock.release()
    Lock(str(tmp_path)).release()  # free again


def test_a_non_finite_loss_stops_the_run_before_anything_is_saved(tiny_model_dir, tmp_path):
    """A checkpoint with one NaN weight (a broken download, a bad conversion) makes every loss NaN."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["encoder.block.0.layer.1.DenseReluDense.wo.weight"][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    proc = train(*train_args(broken, ds_config(tmp_path, 0), out, max_steps=6, eval_every=6), check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and err[-1].startswith("error: step 1: the training loss is not finite"), err[-3:]
    assert not (out / "prompt.safetensors").exists() and not (out / "results.json").exists()


def launch_failing(tiny_model_dir, tmp_path, mode, timeout_s):
    args = train_args(tiny_model_dir, ds_config(tmp_path, 3), tmp_path / "out", max_steps=8, eval_every=8,
                      dist_timeout=timeout_s)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    t = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                             str(free_port()), "tests/rank_failure.py", mode, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # Generous: starting 2 ranks on loaded cores takes a minute, and the launcher waits 30 s for a
        # SIGSTOPped rank to take its SIGTERM before it kills it.
        out, err = proc.communicate(timeout=timeout_s + 300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    return proc.returncode, out + err, time.monotonic() - t


@pytest.mark.distributed
def test_an_error_on_rank_1_is_reported_by_rank_0(tiny_model_dir, tmp_path):
    rc, output, _ = launch_failing(tiny_model_dir, tmp_path, "raise", 120)
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert rc != 0 and lines == ["error: rank 1: ValueError: boom on rank 1"], output[-3000:]
    assert "then rank 0: " in output  # its own failure, named as a consequence


@pytest.mark.distributed
def test_a_stopped_rank_fails_the_run_within_the_timeout_naming_it(tiny_model_dir, tmp_path):
    rc, output, seconds = launch_failing(tiny_model_dir, tmp_path, "stop", 15)
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert rc != 0 and len(lines) == 1, output[-3000:]
    assert lines[0].startswith("error: rank(s) 1 stopped answering (hung, stopped or killed) while rank 0 was at "
                               "step 3"), lines[0]
    assert "rank 1: last at step 3" in lines[0]
    assert "Timed out" in output  # rank 0's own error, after it


def test_the_console_script_runs_from_any_directory(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "softprompt-train")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([script, "--ds_config", "zero3_cpu", "--dry_run", "--inews_content_chars", "0",
                           "--max_length", "24"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parallelism: ZeRO-3, fp32; DeepSpeed JSON " in proc.stdout and "dry run: inputs are valid" in proc.stdout
    assert not (tmp_path / "runs").exists()
