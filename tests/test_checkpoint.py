"""Checkpoints: exact resume after SIGKILL, SIGUSR1 preemption, a SIGTERM to the deepspeed runner alone or
to ranks started without a launcher (as srun does); no frozen weights on disk, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from softprompt import checkpoint
from softprompt.config import ConfigError
from test_distributed import ROOT, ds_config, free_port, read_metrics, run, train_args

STEPS = 60
ARGS = dict(max_steps=STEPS, save_every=5, eval_every=30, keep_checkpoints=2)


def launch(model_dir, ds, out, log: Path | None = None, **extra):
    """A 2-rank run in its own process group, so a test can signal or kill all of it. Output to `log` if
    given (nobody may be reading the pipe once the test stops the runner), else to a pipe."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(free_port()), "train.py", *train_args(model_dir, ds, out, **{**ARGS, **extra})]
    stdout = log.open("w") if log else subprocess.PIPE
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    finally:
        if log:
            stdout.close()


def start_ranks(model_dir, ds, out, log_prefix: Path, **extra) -> list[subprocess.Popen]:
    """2 ranks started as srun starts them: no launcher process, the rendezvous in the environment."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = []
    for rank in range(2):
        with open(f"{log_prefix}{rank}.log", "w") as log:
            ranks.append(subprocess.Popen(
                [sys.executable, "-u", "train.py", *train_args(model_dir, ds, out, **{**ARGS, **extra})], cwd=ROOT,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
    return ranks


def sigterm_trees(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each process and all its descendants, as Slurm signals the processes of a job step."""
    for proc in procs:
        tree = psutil.Process(proc.pid)
        for p in [tree, *tree.children(recursive=True)]:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass


def wait_for_step(proc, out: Path, step: int, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"run ended before step {step}: " + (proc.stdout.read()[-3000:] if proc.stdout else "")
        path = out / "metrics.jsonl"
        if path.exists() and any(json.loads(x)["step"] >= step for x in path.read_text().splitlines() if x):
            return
        time.sleep(0.02)
    raise TimeoutError(f"no step {step} in {timeout}s")


def losses(out):
    return {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    ds = ds_config(tmp, 3)
    reference = tmp / "uninterrupted"
    proc = launch(tiny_model_dir, ds, reference)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    return tiny_model_dir, ds, tmp, reference


def assert_same_run(out, reference):
    ref, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))  # every step logged once, none twice
    assert got == ref  # bit for bit: the same float64 -> JSON text
    a, b = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert a["final_prompt_sha256"] == b["final_prompt_sha256"]
    assert a["test"] == b["test"] and a["best_step"] == b["best_step"]
    assert (out / "prompt.safetensors").read_bytes() == (reference / "prompt.safetensors").read_bytes()


@pytest.mark.distributed
def test_sigkill_then_resume_is_exact(setup):
    model_dir, ds, tmp, reference = setup
    out = tmp / "killed"
    proc = launch(model_dir, ds, out)
    wait_for_step(proc, out, 13)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest in ("step_00000010", "step_00000015")
    proc = launch(model_dir, ds, out, resume="auto")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert f"resumed from {out / 'checkpoints' / latest}" in output
    assert_same_run(out, reference)
    tags = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert tags == ["step_00000055", "step_00000060"]  # --keep_checkpoints 2


@pytest.mark.distributed
def test_sigusr1_saves_and_exits_requeue(setup):
    model_dir, ds, tmp, reference = setup
    out = tmp / "preempted"
    proc = launch(model_dir, ds, out)
    wait_for_step(proc, out, 7)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if any(a.startswith("--local_rank") for a in p.cmdline())]
    assert len(ranks) == 2
    ranks[0].send_signal(signal.SIGUSR1)  # one rank is enough: the flag is all-reduced
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == checkpoint.EXIT_REQUEUE, output[-3000:]
    stopped = int((out / "checkpoints" / "latest").read_text().split("_")[1])
    assert 7 <= stopped < STEPS and not (out / "results.json").exists()
    assert f"preempted: checkpoint saved at step {stopped}" in output
    proc = launch(model_dir, ds, out, resume="auto")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    assert_same_run(out, reference)


def stopped_step(out: Path) -> int:
    return int((out / "checkpoints" / "latest").read_text().split("_")[1])


def exited(procs: list[psutil.Process]) -> bool:
    """Not our children (the test cannot reap them): gone, or a zombie left for their new parent."""
    def done(p):
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return all(done(p) for p in procs)


@pytest.mark.distributed
def test_sigterm_to_the_runner_alone_stops_every_rank(setup):
    """`deepspeed` on one node dies at once on SIGTERM (it installs no handler) and leaves launch.py
    and the ranks running; the ranks notice their launcher is gone, checkpoint and exit 75, and
    launch.py exits with their code: no orphan. --resume auto then completes the same run."""
    model_dir, ds, tmp, reference = setup
    out, log = tmp / "runner_killed", tmp / "runner_killed.log"
    proc = launch(model_dir, ds, out, log)
    wait_for_step(proc, out, 7)
    tree = psutil.Process(proc.pid).children(recursive=True)  # launch.py and the ranks
    assert sum(any(a.startswith("--local_rank") for a in p.cmdline()) for p in tree) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    deadline = time.time() + 60
    while not exited(tree):
        assert time.time() < deadline, f"still running 60 s after the runner died: {tree}\n" + log.read_text()[-3000:]
        time.sleep(0.1)
    output = log.read_text()
    stopped = stopped_step(out)
    assert 7 <= stopped < STEPS and not (out / "results.json").exists(), output[-3000:]
    assert f"preempted: checkpoint saved at step {stopped}" in output and "has exited: stopping" in output
    assert "exits with return code = 75" in output, output[-3000:]  # launch.py, from the first rank to exit
    proc = launch(model_dir, ds, out, resume="auto")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    assert_same_run(out, reference)


@pytest.mark.distributed
def test_sigterm_to_ranks_started_without_a_launcher(setup):
    """What Slurm does on preemption to the ranks srun started (one task per rank): SIGTERM to every
    rank and its children. Each checkpoints and exits 75, so srun's exit code (its tasks' highest) is
    75; started again with --resume auto, the run ends as the uninterrupted one."""
    model_dir, ds, tmp, reference = setup
    out = tmp / "srun_like"
    ranks = start_ranks(model_dir, ds, out, tmp / "srun_like_rank")
    wait_for_step(ranks[0], out, 7)
    sigterm_trees(ranks)
    codes = [rank.wait(timeout=120) for rank in ranks]
    output = (tmp / "srun_like_rank0.log").read_text()
    assert codes == [checkpoint.EXIT_REQUEUE] * 2, output[-3000:]
    stopped = stopped_step(out)
    assert 7 <= stopped < STEPS and f"preempted: checkpoint saved at step {stopped}" in output
    ranks = start_ranks(model_dir, ds, out, tmp / "srun_like_resumed", resume="auto")
    assert [rank.wait(timeout=300) for rank in ranks] == [0, 0], (tmp / "srun_like_resumed0.log").read_text()[-3000:]
    assert_same_run(out, reference)


@pytest.mark.distributed
def test_checkpoint_holds_no_frozen_weights(setup):
    model_dir, _, _, reference = setup
    tag = reference / "checkpoints" / (reference / "checkpoints" / "latest").read_text()
    size = sum(p.stat().st_size for p in tag.rglob("*") if p.is_file())
    frozen = (Path(model_dir) / "model.safetensors").stat().st_size  # 740 KB for the test model
    assert size < 100_000 and size < frozen / 5, f"checkpoint is {size} bytes"
    prompt, meta = checkpoint.load_prompt(tag / "prompt.safetensors")
    assert prompt.shape == (4, 32) and meta["label_names"] == ["0", "1", "2"]


@pytest.mark.distributed
def test_resume_with_another_world_size_is_refused(setup, tmp_path):
    model_dir, ds, _, reference = setup
    cmd = [sys.executable, "train.py", *train_args(model_dir, ds, reference,
                                                   resume="auto", max_steps=STEPS)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "written by 2 ranks, this run has 1" in proc.stderr and "--init_prompt" in proc.stderr


@pytest.mark.distributed
def test_init_prompt_starts_any_world_size_from_an_export(setup, tmp_path):
    model_dir, ds, _, reference = setup
    out = tmp_path / "from_prompt"
    run([sys.executable, "train.py", *train_args(model_dir, ds, out, max_steps=2,
                                                 init_prompt=reference / "prompt.safetensors")])
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((reference / "prompt.safetensors").read_bytes()[:50])
    proc = subprocess.run([sys.executable, "train.py", *train_args(model_dir, ds, tmp_path / "x", init_prompt=bad)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "not a readable prompt file" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_find_checkpoint_and_prune(tmp_path):
    assert checkpoint.find_checkpoint(tmp_path, "auto") is None  # nothing yet: fresh start
    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "rng_rank0.pt"):
        (root / "step_00000004" / name).write_bytes(b"x")
    (root / "step_00000006").mkdir()  # killed mid-save: never made latest
    (root / "latest").write_text("step_00000004")
    assert checkpoint.find_checkpoint(tmp_path, "auto") == root / "step_00000004"
    assert checkpoint.find_checkpoint(tmp_path, str(tmp_path)) == root / "step_00000004"
    assert checkpoint.find_checkpoint(tmp_path, str(root / "step_00000004")) == root / "step_00000004"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoint.find_checkpoint(tmp_path, str(root / "step_00000006"))
    (root / "latest").write_text("step_00000009")
    with pytest.raises(ConfigError, match="no checkpoint directory"):
        checkpoint.find_checkpoint(tmp_path, "auto")
    assert checkpoint.prune_keep(["step_3", "step_1", "step_2"], 2) == ["step_1"]
    assert checkpoint.prune_keep(["step_1"], 2) == []


def test_forget_after_drops_later_records_and_partial_dirs(tmp_path):
    (tmp_path / "checkpoints" / "step_00000006").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (2, 4, 5, 6)))
    checkpoint.forget_after(tmp_path, 4)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000004"]


def test_rng_state_roundtrip():
    state = checkpoint.rng_state()
    a = torch.rand(3)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
