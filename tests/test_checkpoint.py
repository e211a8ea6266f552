"""Checkpoints: exact resume after SIGKILL, SIGUSR1 preemption, a SIGTERM to the deepspeed runner alone or
to ranks started without a launcher (as srun does); no frozen weights on disk, resume at another world
size, nothing unpickled, corrupt files named, bad input."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from softprompt import checkpoint, statefile
from softprompt.config import ConfigError
from test_distributed import ROOT, deepspeed, ds_config, free_port, read_metrics, run, train_args

STEPS = 30
ARGS = dict(max_steps=STEPS, save_every=5, eval_every=15, keep_checkpoints=2)


def tag(step: int) -> str:
    return f"step_{step:08d}"


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
    assert tags == [tag(STEPS - 5), tag(STEPS)]  # --keep_checkpoints 2


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


def one_process(model_dir, ds, out, **extra):
    """A 1-process run of train.py (not asserted to succeed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", *train_args(model_dir, ds, out, **{**ARGS, **extra})],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_close_run(out, reference, steps):
    """Another world size: the same examples per step, another reduction order (as in test_distributed)."""
    ref, got = losses(reference), losses(out)
    assert sorted(got) == sorted(steps)
    assert [got[s] for s in steps] == pytest.approx([ref[s] for s in steps], rel=1e-4, abs=1e-5)


@pytest.mark.distributed
def test_resume_at_another_world_size(setup, tmp_path):
    """ZeRO-3: 2 ranks -> checkpoint -> 1 rank, and 1 rank -> checkpoint -> 2 ranks, with the same
    global batch, continue the uninterrupted 2-rank run. The first resume also drops a torn last
    line of metrics.jsonl (a run killed mid-write)."""
    model_dir, ds, _, reference = setup
    one = tmp_path / "one"
    shutil.copytree(reference, one)
    with (one / "metrics.jsonl").open("a") as f:
        f.write(f'{{"step": {STEPS + 1}, "train/lo')
    proc = run([sys.executable, "train.py", *train_args(model_dir, ds, one, **{
        **ARGS, "resume": one / "checkpoints" / tag(STEPS - 5), "save_every": 1, "keep_checkpoints": 10})])
    assert "written with world size 2, this run has 1: the random generators are re-seeded" in proc.stdout
    assert_close_run(one, reference, range(1, STEPS + 1))  # up to STEPS-5 kept as they were, the rest by one rank
    two = tmp_path / "two"
    proc = launch(model_dir, ds, two, resume=one / "checkpoints" / tag(STEPS - 4))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "written with world size 1, this run has 2" in output
    assert_close_run(two, reference, range(STEPS - 3, STEPS + 1))
    final = [checkpoint.load_prompt(d / "prompt.safetensors")[0] for d in (one, two, reference)]
    assert torch.allclose(final[0], final[2], rtol=1e-4, atol=1e-5)
    assert torch.allclose(final[1], final[2], rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
def test_resume_at_another_world_size_stage0_with_scheduler(tiny_model_dir, tmp_path):
    """ZeRO stage 0 (every rank holds the whole optimizer state): 2 -> 1 -> 2 ranks; a warmup-decay
    schedule continues exactly (the lr logged at every step equals the uninterrupted run's)."""
    cfg = json.loads(Path(ds_config(tmp_path, 0)).read_text())
    cfg["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.3,
                                                            "warmup_num_steps": 4, "total_num_steps": 8}}
    ds = tmp_path / "stage0_sched.json"
    ds.write_text(json.dumps(cfg))
    args = dict(max_steps=8, save_every=2, keep_checkpoints=10, eval_every=4)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    deepspeed("train.py", *train_args(tiny_model_dir, ds, a, **args))
    run([sys.executable, "train.py",
         *train_args(tiny_model_dir, ds, b, **args, resume=a / "checkpoints" / "step_00000002")])
    deepspeed("train.py", *train_args(tiny_model_dir, ds, c, **args, resume=b / "checkpoints" / "step_00000004"))
    assert_close_run(b, a, range(3, 9))
    assert_close_run(c, a, range(5, 9))
    lrs = [{r["step"]: r["train/lr"] for r in read_metrics(d) if "train/lr" in r} for d in (a, b, c)]
    assert len(set(lrs[0].values())) == 6  # warmup, then decay: the lr changes across the resumes
    assert lrs[1] == {s: lrs[0][s] for s in range(3, 9)} and lrs[2] == {s: lrs[0][s] for s in range(5, 9)}


@pytest.mark.distributed
def test_adafactor_resumes_exactly(tiny_model_dir, tmp_path):
    """The shipped Adafactor config (ZeRO-3; a client optimizer whose step and RMS are Python numbers)."""
    ds = ROOT / "ds_configs" / "zero3_cpu_adafactor.json"
    args = dict(max_steps=4, save_every=2, keep_checkpoints=5, eval_every=2)
    a, b = tmp_path / "a", tmp_path / "b"
    deepspeed("train.py", *train_args(tiny_model_dir, ds, a, **args))
    deepspeed("train.py", *train_args(tiny_model_dir, ds, b, **args, resume=a / "checkpoints" / "step_00000002"))
    assert losses(b) == {s: x for s, x in losses(a).items() if s > 2}
    assert (a / "prompt.safetensors").read_bytes() == (b / "prompt.safetensors").read_bytes()
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["final_prompt_sha256"] == rb["final_prompt_sha256"] and ra["test"] == rb["test"]


def copy_checkpoint(reference: Path, out: Path, name: str = tag(STEPS)) -> Path:
    """OUTPUT_DIR `out` with a copy of one of `reference`'s checkpoints as its latest."""
    shutil.copytree(reference / "checkpoints" / name, out / "checkpoints" / name)
    (out / "checkpoints" / "latest").write_text(name)
    return out / "checkpoints" / name


class Payload:
    """Unpickling this runs open(marker, "w"): what a crafted checkpoint file could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.distributed
def test_planted_pickles_are_never_loaded(setup, tmp_path):
    model_dir, ds, _, reference = setup
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Payload(marker))
    pickle.loads(evil).close()
    assert marker.exists()  # the payload does run when unpickled
    marker.unlink()
    kinds = ["rng_rank0.pt", "mp_rank_01_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    for name in kinds:  # each kind alone: refused by its name, before any file is read
        ckpt = copy_checkpoint(reference, tmp_path / name)
        (ckpt / name).write_bytes(evil)
        with pytest.raises(ConfigError, match=f"holds {re.escape(name)}: pickle files are never loaded"):
            checkpoint.find_checkpoint(tmp_path / name, "auto")
    out = tmp_path / "all"
    ckpt = copy_checkpoint(reference, out)
    for name in kinds:
        (ckpt / name).write_bytes(evil)
    proc = one_process(model_dir, ds, out, resume="auto")
    assert proc.returncode == 2 and "pickle files are never loaded" in proc.stderr, proc.stderr[-3000:]
    # A checkpoint of the old format (DeepSpeed's pickles, no checksums): refused with a way out.
    old = tmp_path / "old" / "checkpoints" / "step_00000010"
    old.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "rng_rank0.pt", "rng_rank1.pt"):
        (old / name).write_bytes(evil)
    (old.parent / "latest").write_text(old.name)
    with pytest.raises(ConfigError, match="older softprompt in DeepSpeed's pickle format.*--init_prompt"):
        checkpoint.find_checkpoint(tmp_path / "old", "auto")
    # A payload in place of a safetensors file, its checksum made to match: the parser refuses it
    # (after a 1-rank build: this also resumes a 2-rank checkpoint on one rank).
    out = tmp_path / "garbage"
    ckpt = copy_checkpoint(reference, out)
    (ckpt / "optimizer.safetensors").write_bytes(evil)
    sums = (ckpt / "checksums.sha256").read_text()
    sums = re.sub(r"\w+(  optimizer.safetensors)", lambda m: statefile.sha256(evil) + m[1], sums)
    (ckpt / "checksums.sha256").write_text(sums)
    proc = one_process(model_dir, ds, out, resume="auto")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "optimizer.safetensors is not a valid safetensors file" in proc.stderr
    assert not marker.exists()


@pytest.mark.distributed
def test_corrupt_or_foreign_checkpoint_is_refused(setup, tmp_path):
    model_dir, ds, _, reference = setup
    out = tmp_path / "flipped"
    ckpt = copy_checkpoint(reference, out)
    data = bytearray((ckpt / "optimizer.safetensors").read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # the same size, other values
    (ckpt / "optimizer.safetensors").write_bytes(bytes(data))
    proc = one_process(model_dir, ds, out, resume="auto")
    assert proc.returncode == 2
    assert f"checkpoint {ckpt}: optimizer.safetensors fails its checksum: the file is corrupt" in proc.stderr
    # Another --seed and --prompt_init than the run that wrote the checkpoint: refused before any output.
    proc = one_process(model_dir, ds, tmp_path / "x", resume=reference / "checkpoints" / tag(STEPS),
                       seed=2, prompt_init="random")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'prompt_init "vocab" (checkpoint) != "random" (this run)' in proc.stderr
    assert "seed 1 (checkpoint) != 2 (this run)" in proc.stderr
    assert not (tmp_path / "x").exists()


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


def fake_checkpoint(path: Path, files: dict[str, bytes]) -> None:
    """A directory that passes `verify_checkpoint`: a manifest, one RNG file, checksums over all."""
    path.mkdir(parents=True)
    manifest = {"format": checkpoint.FORMAT, "step": 4, "world_size": 1, "fingerprint": {}, "engine": {},
                "optimizer": {}}
    files = {checkpoint.MANIFEST: json.dumps(manifest).encode(), "rng_rank0.safetensors": b"x", **files}
    for name, data in files.items():
        (path / name).write_bytes(data)
    statefile.write_checksums(path, list(files))


def test_find_checkpoint_and_prune(tmp_path):
    assert checkpoint.find_checkpoint(tmp_path, "auto") is None  # nothing yet: fresh start
    root = tmp_path / "checkpoints"
    fake_checkpoint(root / "step_00000004", {})
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


def test_verify_names_the_bad_file(tmp_path):
    path = tmp_path / "step_00000004"
    fake_checkpoint(path, {"params.safetensors": b"abc"})
    assert checkpoint.verify_checkpoint(path)["step"] == 4
    (path / "params.safetensors").write_bytes(b"abd")
    with pytest.raises(ConfigError, match=f"checkpoint {path}: params.safetensors fails its checksum"):
        checkpoint.verify_checkpoint(path)
    (path / "params.safetensors").unlink()
    with pytest.raises(ConfigError, match="params.safetensors is missing"):
        checkpoint.verify_checkpoint(path)
    (path / "params.safetensors").write_bytes(b"abc")
    (path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="notes.txt not listed in checksums.sha256"):
        checkpoint.verify_checkpoint(path)
    (path / "notes.txt").unlink()
    (path / "checksums.sha256").write_text("not a checksum line\n")
    with pytest.raises(ConfigError, match="checksums.sha256 line 1 is not"):
        checkpoint.verify_checkpoint(path)


def test_sha256sum_checks_a_checkpoint(tmp_path):
    fake_checkpoint(tmp_path / "c", {"params.safetensors": b"abc"})
    proc = subprocess.run(["sha256sum", "-c", "checksums.sha256"], cwd=tmp_path / "c", capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.count(": OK") == 3


def test_forget_after_drops_later_records_and_partial_dirs(tmp_path):
    (tmp_path / "checkpoints" / "step_00000006").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (2, 4, 5, 6)))
    checkpoint.forget_after(tmp_path, 4)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000004"]


def test_forget_after_drops_a_torn_last_line_only(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = "".join(json.dumps({"step": s, "train/loss": 1.5}) + "\n" for s in (1, 2, 3))
    metrics.write_text(records + '{"step": 4, "train/lo')  # killed (or out of disk) mid-write
    checkpoint.forget_after(tmp_path, 3)
    assert metrics.read_text() == records
    metrics.write_text(records.replace('{"step": 2, "train/loss": 1.5}', '{"step": 2, "tr') + records)
    with pytest.raises(ConfigError, match=f"{metrics} line 2: not a JSON record with a step"):
        checkpoint.forget_after(tmp_path, 3)
    fake_checkpoint(tmp_path / "checkpoints" / "step_00000004", {})
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004")
    with pytest.raises(ConfigError, match="line 2"):  # found in `validate`, before any process group exists
        checkpoint.find_checkpoint(tmp_path, "auto")


def test_check_fingerprint_names_every_mismatch():
    saved = {"seed": 1, "prompt_init": "vocab", "label_names": ["0", "1"], "global_batch": 8, "old_only": 1}
    checkpoint.check_fingerprint(saved, {**saved, "new_only": 2}, "ck")  # fields recorded by one side only pass
    checkpoint.check_fingerprint(saved, {**saved, "label_names": ("0", "1")}, "ck")  # compared as JSON
    with pytest.raises(ConfigError) as e:
        checkpoint.check_fingerprint(saved, {**saved, "seed": 2, "prompt_init": "random"}, "ck")
    assert str(e.value).startswith('checkpoint ck belongs to another run: prompt_init "vocab" (checkpoint) != '
                                   '"random" (this run); seed 1 (checkpoint) != 2 (this run).')
    assert "global_batch" not in str(e.value)


def test_client_state_round_trips_through_json_and_safetensors(tmp_path):
    state = {"step": 7, "best": {"step": 5, "metrics": {"accuracy": 0.5, "f1": {"a": 1.0}}, "test": None,
                                 "state": {"weight": torch.randn(1, 4, 3)}},
             "window": torch.tensor([1.5, 2.0, 3.0], dtype=torch.float64), "window_s": 0.1 + 0.2,
             "guards": {"collapsed_steps": [3], "runaway_step": None, "init_norm": 2.5}, "wandb_run_id": None}
    doc, tensors = statefile.split_tensors(state)
    statefile.save_tensors(tmp_path / "t.safetensors", tensors)
    (tmp_path / "t.json").write_text(json.dumps(doc))
    statefile.write_checksums(tmp_path, ["t.safetensors", "t.json"])
    sums = statefile.read_checksums(tmp_path, "x")
    back = statefile.join_tensors(statefile.load_json(tmp_path, "t.json", sums, "x"),
                                  statefile.load_tensors(tmp_path, "t.safetensors", sums, "x"), "x")
    assert torch.equal(back.pop("window"), state["window"]) and back["window_s"] == 0.1 + 0.2
    assert torch.equal(back["best"].pop("state")["weight"], state["best"]["state"]["weight"])
    expected = {k: v for k, v in state.items() if k != "window"}
    expected["best"] = {k: v for k, v in state["best"].items() if k != "state"}
    assert back == expected
    with pytest.raises(TypeError, match="best/when: set"):
        statefile.split_tensors({"best": {"when": {1}}})


def test_prompt_files_are_never_non_finite(tmp_path):
    prompt = torch.zeros(4, 3)
    checkpoint.save_prompt(tmp_path / "ok", prompt, {})
    prompt[1, 2], prompt[3, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 NaN/Inf values"):
        checkpoint.save_prompt(tmp_path / "bad", prompt, {})
    assert not (tmp_path / "bad").exists()
    from safetensors.torch import save_file

    (tmp_path / "bad").mkdir()
    save_file({"prompt": prompt}, tmp_path / "bad" / "prompt.safetensors")
    with pytest.raises(ConfigError, match=r"--init_prompt .*bad/prompt.safetensors: the prompt has 2 NaN/Inf values"):
        checkpoint.load_prompt(tmp_path / "bad" / "prompt.safetensors", flag="--init_prompt")


def test_rng_state_roundtrip(tmp_path):
    import random

    import numpy as np

    random.gauss(0, 1)  # python and numpy cache a second gaussian: part of their state
    np.random.standard_normal()
    state = checkpoint.rng_state()
    statefile.save_tensors(tmp_path / "rng.safetensors", state)
    a = (torch.rand(3), random.gauss(0, 1), np.random.standard_normal(3))
    statefile.reseed(123)
    checkpoint.set_rng_state(statefile.load_tensors(tmp_path, "rng.safetensors",
                                                    {"rng.safetensors": statefile.sha256(
                                                        (tmp_path / "rng.safetensors").read_bytes())}, "x"))
    b = (torch.rand(3), random.gauss(0, 1), np.random.standard_normal(3))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])
