"""W&B and metrics.jsonl: offline 2-rank runs read back from their .wandb logs (one of them SIGTERMed
with its W&B service, as Slurm preempts), then Tracker, progress lines and flags."""

import base64
import fcntl
import hashlib
import json
import math
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import threading
from collections import defaultdict
from pathlib import Path

import psutil
import pytest

from launcher import aggregate, cli, sweep
from softprompt import checkpoint
from softprompt.config import ConfigError
from softprompt.progress import duration, plain_progress, progress_line
from softprompt.tracking import (RUNAWAY_RATIO, Table, Tracker, WandbSettings, collapsed, default_wandb_mode,
                                 git_commit, norm_guard, stability, wandb_settings)
from test_aggregate import dataset
from test_checkpoint import sigterm_trees, start_ranks, stopped_step, wait_for_step
from test_distributed import P, ROOT, STEPS, deepspeed, ds_config, read_metrics, train_args

# A plain progress line (softprompt/progress.py), e.g. "step 3/6 (50%) loss 1.0986 tokens/s 5123 elapsed 4s ETA 4s".
PROGRESS = re.compile(r"step (\d+)/(\d+) \((\d+)%\) loss \d+\.\d{4} tokens/s \d+ elapsed \S+ ETA \S+")
WARNING = "warning: W&B "
SIGTERM_STEPS = 12  # the SIGTERMed run's length: it is signalled at step 3 (--save_every 5)


class Listener:
    """A loopback port that counts and drops connections: stands in for the W&B server and proxies."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections += 1
            conn.close()


def hermetic_wandb_env(mp: pytest.MonkeyPatch, tmp: Path, url: str) -> Path:
    """W&B's files under `tmp`; every way out of the machine (W&B server, proxies) points at `url`."""
    for name in ("WANDB_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        mp.setenv(name, url)
    for name in ("NO_PROXY", "no_proxy", "WANDB_API_KEY"):
        mp.delenv(name, raising=False)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        (tmp / name).mkdir(parents=True, exist_ok=True)
        mp.setenv(name, str(tmp / name))
    return tmp / "WANDB_DIR" / "wandb"


def read_wandb(run_dir: Path) -> list[dict]:
    """The records of an offline run's .wandb log, via `wandb leet inspect --json` (one per line)."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def history(records: list[dict], run_dir: Path) -> dict[int, dict]:
    """step -> W&B history row, without W&B's own `_` keys; a table (stored as a file, its fields
    flattened to `key._type`, `key.path`, ...) replaced by its rows, as metrics.jsonl writes it."""
    rows = {}
    for r in records:
        if r["type"] != "history":
            continue
        item = r["history"]["item"]
        tables = {k.rsplit(".", 1)[0] for k, v in item.items() if k.endswith("._type") and v == "table-file"}
        row = {k: v for k, v in item.items() if not k.startswith("_") and k.split(".")[0] not in tables}
        for key in tables:
            row[key] = json.loads((run_dir / "files" / item[f"{key}.path"]).read_text())["data"]
        rows[item["_step"]] = row
    return rows


def summary(records: list[dict]) -> dict:
    """The run's final summary: its summary records' updates in order."""
    out = {}
    for r in records:
        if r["type"] == "summary":
            out.update(r["summary"].get("update", {}))
    return out


def jsonl_by_step(out: Path) -> dict[int, dict]:
    """metrics.jsonl's events merged per step, as W&B merges them into one history row."""
    rows = defaultdict(dict)
    for record in read_metrics(out):
        rows[record.pop("step")].update(record)
    return dict(rows)


@pytest.fixture(scope="module")
def wandb_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    listener = Listener()
    out = tmp / "out"
    ds = ds_config(tmp, 3)
    with pytest.MonkeyPatch.context() as mp:  # test_distributed's `run` passes os.environ on
        wandb_root = hermetic_wandb_env(mp, tmp, listener.url)
        # conftest's WANDB_MODE=disabled stays set: the explicit --wandb_mode must win over it.
        proc = deepspeed("train.py", *train_args(tiny_model_dir, ds, out, wandb_project="p", wandb_mode="offline",
                                                 wandb_group="g", wandb_tags="a,b", peak_tflops=1, eval_every=2))
    listener.sock.close()
    return out, ds, wandb_root, listener, proc.stdout


@pytest.mark.distributed
def test_one_offline_run_from_rank_zero_no_network(wandb_run):
    out, _, wandb_root, listener, _ = wandb_run
    runs = sorted(p.name for p in wandb_root.iterdir() if "run-" in p.name and p.is_dir())
    assert len(runs) == 1 and runs[0].startswith("offline-run-"), runs  # none from rank 1
    assert not (out / "wandb").exists()  # WANDB_DIR wins over the output dir
    assert listener.connections == 0, "offline mode must not touch the network"
    exits = [r["exit"] for r in read_wandb(wandb_root / runs[0]) if r["type"] == "exit"]
    assert exits == [{"exit_code": 0, "runtime": exits[0]["runtime"]}]


@pytest.mark.distributed
def test_wandb_config_and_history_mirror_metrics_jsonl(wandb_run):
    out, ds, wandb_root, _, _ = wandb_run
    run_dir = next(wandb_root.glob("offline-run-*"))
    records = read_wandb(run_dir)
    run = next(r["run"] for r in records if r["type"] == "run")
    assert (run["project"], run["run_group"], run["tags"]) == ("p", "g", ["a", "b"])
    assert run["display_name"] == f"model_pl{P}_init-vocab_s1"  # the tiny model lives in .../model
    config = run["config"]["update"]
    assert config["ds_config"] == {**json.loads(Path(ds).read_text()), "gradient_accumulation_steps": 1}  # resolved
    assert config["batch"] == {"global_batch": 8, "micro_batch": 4, "grad_accum": 1, "world_size": 2}
    assert config["world_size"] == 2 and config["git_commit"] == git_commit()
    assert config["params_trainable"] == P * 32 < config["params_total"]
    assert config["train"]["wandb_mode"] == "offline" and config["model"]["prompt_length"] == P
    assert config["wandb"]["mode"] == "offline" and config["recipe"]["lr"] == 0.3

    logged = history(records, run_dir)
    assert logged == jsonl_by_step(out)  # same steps, keys and values
    train = [row for row in logged.values() if "train/loss" in row]
    assert {"train/step_time_s", "train/mfu", "train/prompt_norm", "train/grad_norm",
            "train/peak_rss_mb"} <= set(train[0])
    assert all(0 < row["train/mfu"] < 1 and row["train/prompt_norm"] > 0 for row in train)
    final = logged[max(logged)]
    assert isinstance(final["eval/collapsed"], bool) and isinstance(final["test/collapsed"], bool)
    assert sum(map(sum, final["test/confusion"])) == 999


@pytest.mark.distributed
def test_wandb_summary_sorts_a_sweep_and_holds_the_prompt(wandb_run):
    """The summary: the best dev scores (max over the evals of metrics.jsonl), the best-dev prompt's test
    scores (results.json), the sweep's axes; the prompt file as an artifact."""
    out, _, wandb_root, _, _ = wandb_run
    run_dir = next(wandb_root.glob("offline-run-*"))
    records = read_wandb(run_dir)
    got = summary(records)
    metrics, results = read_metrics(out), json.loads((out / "results.json").read_text())
    evals = [r for r in metrics if "eval/accuracy" in r]
    assert len(evals) == 3  # steps 2, 4, 6
    for key in ("eval/accuracy", "eval/macro_f1"):
        assert got[key] == {"max": max(r[key] for r in evals)}
    assert got["test/accuracy"] == results["test"]["accuracy"] and got["test/macro_f1"] == results["test"]["macro_f1"]
    assert got["train/loss"] == [r["train/loss"] for r in metrics if "train/loss" in r][-1]
    assert got["best_step"] == results["best_step"]
    assert {k: got[k] for k in ("model", "prompt_length", "init", "prompt_depth", "lr", "seed")} == {
        "model": "model", "prompt_length": P, "init": "vocab", "prompt_depth": "input", "lr": 0.3, "seed": 1}

    run_id = next(r["run"]["run_id"] for r in records if r["type"] == "run")
    (artifact,) = [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "prompt"]
    assert artifact["name"] == f"prompt-{run_id}"
    assert json.loads(artifact["metadata"]) == json.loads((out / "prompt.json").read_text())
    files = {f["path"]: f["digest"] for f in artifact["manifest"]["contents"]}
    assert files == {name: base64.b64encode(hashlib.md5((out / name).read_bytes()).digest()).decode()
                     for name in ("prompt.safetensors", "prompt.json")}


@pytest.mark.distributed
def test_plain_progress_lines_in_a_batch_log(wandb_run):
    """stdout is a pipe and the run is --quiet: one plain line per logged step from rank 0, no bar."""
    *_, stdout = wandb_run
    lines = [line for line in stdout.splitlines() if line.startswith("step ") and "dev accuracy" not in line]
    assert all(PROGRESS.fullmatch(line) for line in lines), lines
    steps = [tuple(map(int, PROGRESS.fullmatch(line).groups())) for line in lines]
    assert steps == [(s, STEPS, round(100 * s / STEPS)) for s in range(1, STEPS + 1)]  # --log_every 1, rank 0 only
    assert lines[-1].endswith("ETA 0s") and "\r" not in stdout and WARNING not in stdout


@pytest.mark.distributed
def test_sigterm_to_ranks_and_wandb_still_checkpoints(tiny_model_dir, tmp_path, monkeypatch):
    """Slurm's preemption: SIGTERM to every process of the step, the ranks and their children, W&B's
    service among them. Rank 0 warns once that W&B failed, both ranks checkpoint and exit 75 with
    metrics.jsonl intact, and --resume auto finishes in the same W&B run. W&B is on through
    $WANDB_PROJECT alone, its group from $WANDB_RUN_GROUP (as launcher.sweep sets it)."""
    listener = Listener()
    wandb_root = hermetic_wandb_env(monkeypatch, tmp_path, listener.url)
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-7")
    ds, out = ds_config(tmp_path, 3), tmp_path / "out"
    ranks = start_ranks(tiny_model_dir, ds, out, tmp_path / "rank", max_steps=SIGTERM_STEPS)
    wait_for_step(ranks[0], out, 3)
    services = [p for p in psutil.Process(ranks[0].pid).children(recursive=True) if p.name() == "wandb-core"]
    assert len(services) == 1  # rank 0's only
    sigterm_trees(ranks)
    codes = [rank.wait(timeout=120) for rank in ranks]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [checkpoint.EXIT_REQUEUE] * 2, logs[0][-3000:]
    stopped = stopped_step(out)
    assert 3 <= stopped < SIGTERM_STEPS and f"preempted: checkpoint saved at step {stopped}" in logs[0]
    warnings = [line for line in logs[0].splitlines() if line.startswith(WARNING)]
    assert len(warnings) == 1 and " failed (" in warnings[0] and WARNING not in logs[1], warnings
    assert "Traceback" not in logs[0]
    assert sorted(r["step"] for r in read_metrics(out) if "train/loss" in r) == list(range(1, stopped + 1))

    ranks = start_ranks(tiny_model_dir, ds, out, tmp_path / "resumed", max_steps=SIGTERM_STEPS, resume="auto")
    assert [rank.wait(timeout=300) for rank in ranks] == [0, 0], (tmp_path / "resumed0.log").read_text()[-3000:]
    assert sorted(r["step"] for r in read_metrics(out) if "train/loss" in r) == list(range(1, SIGTERM_STEPS + 1))
    results = json.loads((out / "results.json").read_text())
    assert results["wandb"] == {"project": "env-project", "mode": "offline", "name": "model_pl4_init-vocab_s1",
                                "group": "sweep-7", "tags": []}
    sessions = sorted(wandb_root.glob("offline-run-*"))  # the preempted one, then the resumed one
    assert len(sessions) == 2 and len({p.name.rsplit("-", 1)[1] for p in sessions}) == 1  # one W&B run
    records = read_wandb(sessions[1])
    run = next(r["run"] for r in records if r["type"] == "run")
    assert (run["project"], run["run_group"]) == ("env-project", "sweep-7")
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]
    assert summary(records)["test/accuracy"] == results["test"]["accuracy"]
    assert listener.connections == 0


def tracker_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """`body` run in a fresh process (W&B keeps process-wide state) with Tracker, WandbSettings, psutil,
    signal and `out` (tmp_path / "out") at hand."""
    code = "import psutil, signal\nfrom pathlib import Path\nfrom softprompt.tracking import Tracker, WandbSettings\n"
    code += f"out = Path({str(tmp_path / 'out')!r})\n" + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_tracker_goes_on_without_a_dead_wandb_service(tmp_path, monkeypatch):
    """wandb-core killed mid-run: one warning naming the error, metrics.jsonl goes on, no traceback at exit."""
    wandb_root = hermetic_wandb_env(monkeypatch, tmp_path, Listener().url)
    proc = tracker_script(tmp_path, """
        tracker = Tracker(out, True, 4, quiet=True, wandb=WandbSettings(project="p", mode="offline", name="n"))
        for step in (1, 2):
            tracker.log(step, {"x": float(step)})
        core = [p for p in psutil.Process().children(recursive=True) if p.name() == "wandb-core"]
        assert len(core) == 1
        core[0].send_signal(signal.SIGTERM)
        psutil.wait_procs(core, timeout=30)
        for step in (3, 4):
            tracker.log(step, {"x": float(step)})
        (out / "prompt.json").write_text("{}")
        (out / "prompt.safetensors").write_bytes(b"")
        tracker.log_outputs(out, 4, prompt=True)
        tracker.close()
        print("run id", tracker.run_id)
    """)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if line.startswith(WARNING)]
    assert len(warnings) == 1 and warnings[0].startswith("warning: W&B log failed ("), proc.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [1, 2, 3, 4]
    run_dir = next(wandb_root.glob("offline-run-*"))
    assert set(history(read_wandb(run_dir), run_dir)) <= {1}  # W&B writes a step's row once the next one comes
    assert f"run id {run_dir.name.rsplit('-', 1)[1]}" in proc.stdout  # kept for a resumed run


def test_tracker_trains_on_when_wandb_cannot_start(tmp_path, monkeypatch):
    """Online without an API key: wandb.init raises; the run goes on, keeping the W&B run id to resume.
    (Online, W&B may reach for the network: the listener, on loopback, is all it finds.)"""
    hermetic_wandb_env(monkeypatch, tmp_path, Listener().url)
    proc = tracker_script(tmp_path, """
        tracker = Tracker(out, True, 2, quiet=True, start_step=1, resume_run_id="abc123",
                          wandb=WandbSettings(project="p", mode="online", name="n"))
        tracker.log(2, {"x": 1.0})
        tracker.close()
        print("run id", tracker.run_id)
    """)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if line.startswith(WARNING)]
    assert len(warnings) == 1 and warnings[0].startswith("warning: W&B init failed (UsageError: No API key")
    assert "run id abc123" in proc.stdout and read_metrics(tmp_path / "out") == [{"step": 2, "x": 1.0}]


def test_progress_line_by_hand():
    # 120 of 334 steps in 130 s of which 10 s were evaluation: 1 s/step, 214 steps left
    assert progress_line(120, 334, 0.81234, 5123.4, 130.0, 10.0, 120) == \
        "step 120/334 (36%) loss 0.8123 tokens/s 5123 elapsed 2m10s ETA 3m34s"
    # resumed at step 100: the rate is this session's 20 steps in 40 s
    assert progress_line(120, 334, 1.0, 10.0, 40.0, 0.0, 20).endswith("elapsed 40s ETA 7m08s")
    assert [duration(x) for x in (0.4, 59.4, 60, 3599, 3600, 7_384, math.nan)] == [
        "0s", "59s", "1m00s", "59m59s", "1h00m", "2h03m", "?"]


def test_a_bar_on_a_terminal_plain_lines_elsewhere(tmp_path, monkeypatch, capsys):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns for the bar
    with os.fdopen(slave, "w") as tty:
        assert not plain_progress(False, tty) and plain_progress(True, tty)
        monkeypatch.setattr(sys, "stderr", tty)
        tracker = Tracker(tmp_path / "tty", True, 4, quiet=False)
        for _ in range(4):
            tracker.advance(loss=0.5, tok_s=100.0)
        tracker.close()
        tty.flush()
        assert capsys.readouterr().out == ""
        shown = b""
        while select.select([master], [], [], 1)[0]:
            shown += os.read(master, 65536)
        assert b"train: 100%" in shown and b"4/4" in shown  # tqdm's bar, on the terminal
    os.close(master)
    monkeypatch.undo()
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as pipe:
        assert plain_progress(False, pipe)
    tracker = Tracker(tmp_path / "pipe", True, 4, quiet=False, start_step=2)  # pytest's stderr is no terminal
    tracker.advance()
    tracker.advance(loss=0.5, tok_s=100.0)
    tracker.close()
    out, err = capsys.readouterr()
    assert PROGRESS.fullmatch(out.strip()) and out.startswith("step 4/4 (100%) loss 0.5000 tokens/s 100 ") and not err


def test_aggregate_names_the_wandb_group_and_panel(tmp_path):
    tasks = sweep.expand(["tiny"], ["random"], [1, 20], [0], tmp_path, ["--dataset", str(dataset(tmp_path / "data"))])
    for task, logged in zip(tasks, [{"project": "p", "mode": "offline", "name": "n", "group": "g", "tags": []}, None]):
        Path(task["output_dir"]).mkdir(parents=True)
        results = {"dev": {"accuracy": 0.5, "macro_f1": 0.4}, "test": {"accuracy": 0.5, "macro_f1": 0.4}}
        (Path(task["output_dir"]) / "results.json").write_text(json.dumps({**results, "wandb": logged}))
    assert aggregate.wandb_note(tasks).startswith("\n## In W&B\n\nproject `p`, group `g` (1 runs). The plot above: "
                                                  "a Scatter plot panel, X `prompt_length` (log scale), Y `test/accuracy`")
    assert aggregate.wandb_note(tasks[1:]) == ""  # no run logged to W&B: no section
    (tmp_path / "sweep.json").write_text(json.dumps({"tasks": tasks}))
    assert aggregate.main([str(tmp_path)]) == 0
    assert (tmp_path / "summary.md").read_text().endswith(aggregate.wandb_note(tasks))


def test_tracker_offline_resume_and_plain_values(tmp_path, monkeypatch):
    listener = Listener()
    wandb_root = hermetic_wandb_env(monkeypatch, tmp_path, listener.url)
    settings = WandbSettings(project="p", mode="offline", name="unit")
    first = Tracker(tmp_path / "out", True, 2, quiet=True, wandb=settings, run_config={"a": 1})
    first.log(1, {"x": math.nan, "y": -math.inf, "ok": True, "t": Table(columns=["u", "v"], data=[[1, 2]])})
    first.close()
    assert read_metrics(tmp_path / "out") == [{"step": 1, "x": "NaN", "y": "-Infinity", "ok": True, "t": [[1, 2]]}]
    run_dir = next(wandb_root.glob(f"offline-run-*-{first.run_id}"))
    assert history(read_wandb(run_dir), run_dir) == {1: {"x": "NaN", "y": "-Infinity", "ok": True, "t": [[1, 2]]}}

    again = Tracker(tmp_path / "out", True, 2, quiet=True, start_step=1, wandb=settings,
                    resume_run_id=first.run_id)
    assert again.run_id == first.run_id
    again.close()
    assert len(list(wandb_root.glob(f"offline-run-*-{first.run_id}"))) == 2  # one offline dir per session
    assert listener.connections == 0


def test_tracker_off_rank_zero_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path / "out", False, 2, wandb=WandbSettings(project="p", mode="offline", name="n"))
    tracker.log(1, {"x": 1.0})
    tracker.close()
    assert tracker.run_id is None and not any(tmp_path.iterdir())


def test_norm_guard_flags_a_runaway_prompt():
    assert norm_guard(21.0, 21.0) == {"train/prompt_norm": 21.0, "train/prompt_norm_ratio": 1.0, "train/runaway": False}
    assert not norm_guard(RUNAWAY_RATIO * 21 - 1, 21.0)["train/runaway"]
    # The reference's published mT5 run: prompt values from about +-8 to about 500.
    assert norm_guard(500.0, 8.0)["train/runaway"] and norm_guard(500.0, 8.0)["train/prompt_norm_ratio"] == 62.5
    assert stability({"collapsed_steps": [], "runaway_step": None}) == "ok"
    assert stability({"collapsed_steps": [3, 6], "runaway_step": 40}) == (
        "dev predictions collapsed onto one class at steps [3, 6]; runaway prompt norm from step 40")


def test_collapsed():
    assert collapsed({"a": 95, "b": 3, "c": 2}) and not collapsed({"a": 94, "b": 6}) and not collapsed({"a": 0})


def settings(args, environ=None):
    return wandb_settings(cli.parse(args), environ if environ is not None else {})


def test_wandb_flags():
    assert settings(["--wandb_project=p", "--wandb_mode=offline", "--wandb_tags=a, b"]) == \
        WandbSettings("p", "offline", "tiny_pl50_init-labels_s0", None, ("a", "b"))
    assert settings(["--wandb_project=p", "--wandb_mode=disabled"]) is None
    assert settings(["--wandb_mode=offline", "--model=google/mt5-xl", "--prompt_length=100", "--prompt_init=labels"],
                    {"WANDB_PROJECT": "env-p"}) == WandbSettings("env-p", "offline", "mt5-xl_pl100_init-labels_s0")
    assert settings([]) is None  # W&B off: nothing resolved
    assert settings(["--wandb_project=p"], {"WANDB_MODE": "offline"}).mode == "offline"
    # The group: --wandb_group, else $WANDB_RUN_GROUP (launcher.sweep's), recorded either way
    assert settings(["--wandb_project=p", "--wandb_mode=offline"], {"WANDB_RUN_GROUP": "sweep"}).group == "sweep"
    assert settings(["--wandb_project=p", "--wandb_mode=offline", "--wandb_group=g"],
                    {"WANDB_RUN_GROUP": "sweep"}).group == "g"


@pytest.mark.parametrize("args, message", [
    (["--wandb_group=g"], "--wandb_group needs --wandb_project"),
    (["--wandb_project=p", "--wandb_mode=cloud"], "--wandb_mode: invalid choice: 'cloud'"),
    (["--wandb_project=p", "--wandb_mode=offline", "--wandb_tags=a,,b"], "has an empty tag"),
    (["--wandb_project= "], "--wandb_project must not be empty"),
    (["--peak_tflops=0"], "--peak_tflops must be a finite number > 0"),
])
def test_wandb_flag_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        settings(args)


def test_default_mode(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"\$WANDB_MODE must be one of"):
        settings(["--wandb_project=p"], {"WANDB_MODE": "dryrun"})
    assert default_wandb_mode({"WANDB_API_KEY": "k" * 40}) == ("online", "default")
    # No key anywhere (environment, netrc, settings): offline. In a fresh process, as wandb caches
    # its settings per process.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT), WANDB_CONFIG_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", "import os; from softprompt.tracking import default_wandb_mode as d; print(d(os.environ))"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "('offline', 'default')", proc.stderr
