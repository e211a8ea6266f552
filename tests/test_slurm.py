"""The Slurm scripts on a real single-node Slurm cluster started here (munged, slurmctld, slurmd as
root in a temp dir, stopped by PID at the end), and a lint of every shell script.

Slurm comes from Debian's packages (slurm/ci/install_slurm.sh, run by .ci/run); when it is missing
and cannot be installed the tests fail rather than skip.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from softprompt.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/train.sbatch", "slurm/sweep.sbatch", "slurm/env.example.sh", "slurm/ci/install_slurm.sh"]
TOOLS = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "shellcheck"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
# Tiny runs: the sweep's are 3 steps; the 2-rank ones long enough (evals every few steps) for a USR1
# to land mid-run.
TRAIN = ["--max_length", "24", "--inews_content_chars", "0", "--eval_batch_size", "128"]
LONG = [*TRAIN, "--prompt_length", "4", "--prompt_init", "vocab", "--seed", "1", "--max_steps", "40",
        "--eval_every", "4", "--log_every", "1", "--quiet"]


def ensure_tools() -> None:
    if any(shutil.which(t) is None for t in TOOLS):
        subprocess.run(["bash", str(ROOT / "slurm/ci/install_slurm.sh")], capture_output=True)
    if missing := [t for t in TOOLS if shutil.which(t) is None]:
        pytest.fail(f"{missing} not installed and slurm/ci/install_slurm.sh could not install them (needs root)")


def wait_for(what: str, check, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


SLURM_CONF = """\
ClusterName=softprompt-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket.2
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# lets the node advertise more CPUs than the machine has
SlurmdParameters=config_overrides
# start jobs at once instead of on the scheduler's timers
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
# no accounting daemon, so no sacct: finished jobs stay visible to `scontrol show job` for 10 min
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
# Preemption as sites run it: a job in a higher-tier partition requeues one in a lower tier, which first
# gets SIGTERM and a grace time. Only jobs in "low" can be preempted, only for the one "token" (a generic
# resource), so that a preemption test leaves the other jobs on the node alone.
GresTypes=token
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName={host} NodeAddr=127.0.0.1 CPUs=16 Gres=token:1 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP PreemptMode=OFF
PartitionName=low Nodes={host} MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=120
PartitionName=urgent Nodes={host} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""


@pytest.fixture(scope="session")
def cluster():
    """A running one-node cluster; yields the environment for Slurm commands and jobs."""
    ensure_tools()
    # Not under pytest's 0700 tmp dirs: munged wants every directory above its socket searchable by
    # all, and the socket's own directory writable by no one else.
    d = Path(tempfile.mkdtemp(prefix="softprompt-slurm-"))
    d.chmod(0o755)
    (d / "munge").mkdir()
    (d / "munge").chmod(0o755)
    (d / "munge/munge.key").write_bytes(os.urandom(1024))
    (d / "munge/munge.key").chmod(0o400)
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    (d / "slurm.conf").write_text(SLURM_CONF.format(host=host, d=d, ctld_port=free_port(), d_port=free_port()))
    (d / "gres.conf").write_text("Name=token Count=1\n")  # read from slurm.conf's directory
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # deepspeed, python of this venv
           "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "SOFTPROMPT_ENV": "/dev/null"}  # not a developer's own slurm/env.sh
    pid_files = [d / "slurmd.pid", d / "slurmctld.pid", d / "munge/munged.pid"]
    try:
        subprocess.run(["munged", f"--socket={d}/munge/munge.socket.2", f"--key-file={d}/munge/munge.key",
                        f"--pid-file={d}/munge/munged.pid", f"--seed-file={d}/munge/munged.seed",
                        f"--log-file={d}/munged.log"], check=True, env=env)
        subprocess.run(["slurmctld", "-i"], check=True, env=env)  # -i: ignore any saved state
        subprocess.run(["slurmd"], check=True, env=env)
        wait_for("the node to be idle", lambda: "idle" in slurm("sinfo", "-h", "-o", "%T", env=env), 30)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        for pid_file in pid_files:
            if pid_file.exists():
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
                wait_for(f"pid {pid} to stop", lambda: not alive(pid), 30)
        shutil.rmtree(d)


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def slurm(*cmd, env) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


def sbatch(*args, env) -> str:
    return slurm("sbatch", "--parsable", *args, env=env).strip().split(";")[0]


def jobs(job_id: str, env) -> list[dict]:
    """`scontrol show job` records (one per array task) as dicts."""
    out = slurm("scontrol", "show", "job", "-o", job_id, env=env)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_job(job_id: str, env, timeout: float) -> list[dict]:
    """Every task of the job in a final state (`sbatch --wait` alone can return 0 for a job that never ran)."""
    def done():
        records = jobs(job_id, env)
        return records if all(r["JobState"] in FINAL_STATES for r in records) else None
    return wait_for(f"job {job_id}", done, timeout, interval=0.5)


def log_of(record: dict, env: dict) -> str:
    """The job's output, and the daemons' logs (why a job failed to launch is only there)."""
    path = Path(record["StdOut"])
    text = path.read_text()[-3000:] if path.exists() else "(no log)"
    conf = Path(env["SLURM_CONF"])
    daemons = [conf.parent / name for name in ("slurmctld.log", "slurmd.log")]
    return text + "".join(f"\n--- {p.name}\n" + p.read_text()[-2000:] for p in daemons if p.exists())


def assert_completed(records: list[dict], env: dict) -> None:
    for r in records:
        assert (r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0"), log_of(r, env)


def ds_config(tmp: Path) -> str:
    """Global batch 8 of micro-batches of 4 (2 ranks: no accumulation; 1 rank: 2 micro-batches)."""
    path = tmp / "zero3.json"
    path.write_text(json.dumps({
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.3, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 100000, "stage3_param_persistence_threshold": 1000},
    }))
    return str(path)


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def submit_train(model_dir, ds: str, tmp: Path, env, *options: str) -> tuple[str, Path]:
    """slurm/train.sbatch on one node with 2 ranks."""
    tmp.mkdir()
    out = tmp / "out"
    job = sbatch("-N1", "--ntasks-per-node=1", "--cpus-per-task=2", f"--output={tmp}/job.log", *options,
                 "slurm/train.sbatch", "--model", str(model_dir), "--ds_config", ds, *LONG,
                 env={**env, "NPROC_PER_NODE": "2", "OUTPUT_DIR": str(out)})
    return job, out


def sweep(model_dir, ds: str, out: Path, env, lengths: str, seeds: str, *train_args: str,
          max_concurrent: int = 0) -> None:
    """A job array of 1-rank tasks through launcher.sweep."""
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.sweep", "--lengths", lengths, "--seeds", seeds, "--models", str(model_dir),
         "--out", str(out), "--max_concurrent", str(max_concurrent), "--", "--ds_config", ds, *train_args],
        cwd=ROOT, env={**env, "NPROC_PER_NODE": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def started(cluster, tiny_model_dir, tmp_path_factory):
    """The module's jobs and the reference run, all started at once so that they share the cores
    (most of a tiny run is one process importing libraries); each test waits for its own."""
    tmp = tmp_path_factory.mktemp("slurm_jobs")
    ds = ds_config(tmp)
    # The reference: the same 2-rank run started directly with the deepspeed launcher.
    direct_out = tmp / "direct"
    direct_log = open(tmp / "direct.log", "w")
    direct = subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
         "train.py", "--model", str(tiny_model_dir), "--ds_config", ds, *LONG, "--output_dir", str(direct_out)],
        cwd=ROOT, env=cluster, stdout=direct_log, stderr=subprocess.STDOUT)
    requeue = submit_train(tiny_model_dir, ds, tmp / "requeue", cluster)
    plain = submit_train(tiny_model_dir, ds, tmp / "plain", cluster)
    # The one job that can be preempted (see SLURM_CONF).
    preempted = submit_train(tiny_model_dir, ds, tmp / "preempted", cluster, "--partition=low", "--gres=token:1")
    sweep(tiny_model_dir, ds, tmp / "sweep", cluster, "1,2,4", "0,1", "--max_steps", "3", *TRAIN, max_concurrent=2)
    sweep(tiny_model_dir, ds, tmp / "array", cluster, "4", "0,1,2", "--max_steps", "40", "--eval_every", "4",
          "--log_every", "1", *TRAIN)

    def direct_run() -> Path:
        assert direct.wait(timeout=300) == 0, (tmp / "direct.log").read_text()[-3000:]
        return direct_out

    yield {"direct": direct_run, "requeue": requeue, "plain": plain, "preempted": preempted,
           "sweep": tmp / "sweep", "array": tmp / "array"}
    direct.kill()
    direct.wait()
    direct_log.close()


def trained(out: Path) -> bool:
    return (out / "metrics.jsonl").exists() and len(losses(out)) >= 2


@pytest.fixture(scope="module")
def interrupted(cluster, started):
    """Each run to interrupt gets its signal as soon as it trains, all watched together: a test that
    waited for its own first would let the others' runs finish before their signal."""
    env, done = cluster, {}

    def usr1():  # what Slurm sends 300 s before the time limit (--signal=B:USR1@300): to the batch shell only
        job, out = started["requeue"]
        if trained(out):
            slurm("scancel", "--signal=USR1", "--batch", job, env=env)
            return True

    def preempt():  # a job in a higher partition that needs the token the run holds
        job, out = started["preempted"]
        if trained(out):
            done["urgent"] = sbatch("--partition=urgent", "--gres=token:1", f"--output={out.parent}/urgent.log",
                                    "--wrap", "true", env=env)
            return True

    def array_usr1():  # to the one task whose job id is also the whole array's
        sweep_json = json.loads((started["array"] / "sweep.json").read_text())
        array = sweep_json["job_id"]
        records = jobs(array, env)
        if len(records) < 3 or any(r["JobState"] != "RUNNING" for r in records):
            return False
        [target] = [r for r in records if r["JobId"] == r["ArrayJobId"] == array]
        task = int(target["ArrayTaskId"])
        out = Path(sweep_json["tasks"][task]["output_dir"])
        if trained(out):
            slurm("scancel", "--signal=USR1", "--batch", f"{array}_{task}", env=env)
            done["array"] = (array, task, out)
            return True

    actions = [usr1, preempt, array_usr1]
    def all_sent():
        actions[:] = [a for a in actions if not a()]
        return not actions
    wait_for("the runs to interrupt to train", all_sent, 400, 0.05)
    return done


def start_requeued(job: str, name: str, env) -> None:
    """Wait for job `name` (an id, or ARRAY_TASK for an array task) to be requeued, then start it now."""
    def requeued():
        r = jobs(name, env)[0]
        return r if r["Restarts"] == "1" or r["JobState"] in FINAL_STATES else None
    if wait_for(f"the requeue of {name}", requeued, 120)["JobState"] != "PENDING":
        return  # finished, or restarted by Slurm once its hold was over
    # PENDING comes before slurmd has torn the old instance down; released into that, the new batch step
    # is refused ("Job 1 already killed, do not launch batch job") and the job ends FAILED.
    def old_instance_gone():
        return subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\."], capture_output=True).returncode == 1
    wait_for("the old instance's slurmstepd to exit", old_instance_gone, 120)
    # slurmd revokes the old credential at the requeue's second and refuses any credential made in that
    # same second ("ctime <= revoked", whole seconds: "Job credential revoked"); real Slurm's 2-minute
    # hold avoids it, so the test must start the new instance in a later second.
    time.sleep(2)
    # Slurm holds a requeued job for 2 minutes (EligibleTime); release it now. Not checked: it may
    # have started by itself meanwhile.
    subprocess.run(["scontrol", "update", f"JobId={name}", "StartTime=now"], env=env, capture_output=True)


def assert_resumed_like_direct(record: dict, out: Path, started: dict, env: dict) -> None:
    """Completed after one requeue, and the same run as the uninterrupted direct one."""
    assert_completed([record], env)
    log = Path(record["StdOut"]).read_text()  # both runs: --open-mode=append
    assert record["Restarts"] == "1", f"the run was not requeued (did it finish before the signal landed?)\n{log}"
    assert "requeueing job" in log and "restart 0)" in log and "restart 1)" in log, log
    direct = started["direct"]()
    expected = load_file(direct / "prompt.safetensors")["prompt"]
    assert load_file(out / "prompt.safetensors")["prompt"].equal(expected)
    assert losses(out) == pytest.approx(losses(direct), rel=1e-4)


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_resumes(cluster, started, interrupted):
    job, out = started["requeue"]
    start_requeued(job, job, cluster)
    [record] = wait_job(job, cluster, timeout=300)
    assert_resumed_like_direct(record, out, started, cluster)


@pytest.mark.slurm
def test_preemption_checkpoints_requeues_and_resumes(cluster, started, interrupted):
    """A real preemption: Slurm sends SIGTERM to the job's steps (the ranks, not the batch shell or
    srun) and gives it GraceTime; the ranks checkpoint and exit 75, the script requeues the job."""
    job, out = started["preempted"]
    start_requeued(job, job, cluster)
    [preemptor] = wait_job(interrupted["urgent"], cluster, timeout=120)
    assert_completed([preemptor], cluster)
    [record] = wait_job(job, cluster, timeout=300)
    log = Path(record["StdOut"]).read_text()
    assert "preempted: checkpoint saved at step" in log and "Exited with exit code 75" in log, log
    assert_resumed_like_direct(record, out, started, cluster)


@pytest.mark.slurm
def test_array_task_requeues_only_itself(cluster, started, interrupted):
    """USR1 to the one task whose job id is also the array's: it alone is requeued and resumes."""
    array, task, task_out = interrupted["array"]
    start_requeued(array, f"{array}_{task}", cluster)
    records = {int(r["ArrayTaskId"]): r for r in wait_job(array, cluster, timeout=300)}
    assert sorted(records) == [0, 1, 2]
    assert_completed(list(records.values()), cluster)
    for i, r in records.items():
        log = Path(r["StdOut"]).read_text()
        if i == task:
            assert r["Restarts"] == "1" and f"requeueing job {array}_{task}" in log and "restart 1)" in log, log
            assert "resumed from" in log, log
            steps = [json.loads(x)["step"] for x in (task_out / "metrics.jsonl").read_text().splitlines()
                     if "train/loss" in x]
            assert steps == list(range(1, 41))
        else:
            assert r["Restarts"] == "0" and log.count("restart 0)") == 1, log
            assert "requeueing" not in log and "restart 1)" not in log, log


@pytest.mark.slurm
def test_train_sbatch_two_ranks_matches_direct_run(cluster, started):
    job, out = started["plain"]
    [record] = wait_job(job, cluster, timeout=300)
    assert_completed([record], cluster)
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert len(losses(out)) == 40
    direct = started["direct"]()
    assert losses(out) == pytest.approx(losses(direct), rel=1e-4)
    assert results["test"]["confusion"] == json.loads((direct / "results.json").read_text())["test"]["confusion"]


@pytest.mark.slurm
def test_sweep_array_then_aggregate(cluster, started):
    out = started["sweep"]
    sweep = json.loads((out / "sweep.json").read_text())
    records = wait_job(sweep["job_id"], cluster, timeout=300)
    assert sorted(int(r["ArrayTaskId"]) for r in records) == list(range(6))
    assert_completed(records, cluster)

    proc = subprocess.run([sys.executable, "-m", "launcher.aggregate", str(out)], cwd=ROOT, env=cluster,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "6 of 6 tasks finished" in proc.stdout, proc.stderr
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 3
    assert [line.split(",")[2:5] for line in csv_lines[1:]] == [["1", "2", "2"], ["2", "2", "2"], ["4", "2", "2"]]
    md = (out / "summary.md").read_text()
    assert md.count("| 2/2 |") == 3 and "Missing" not in md
    assert (out / "prompt_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scripts_parse_and_are_shellcheck_clean():
    ensure_tools()
    for script in [*SCRIPTS, ".ci/run"]:
        proc = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
