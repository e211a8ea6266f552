"""W&B and metrics.jsonl: an offline 2-rank run read back from its .wandb log, then Tracker and flags."""

import json
import math
import os
import socket
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from launcher import cli
from softprompt.config import ConfigError
from softprompt.tracking import (RUNAWAY_RATIO, Table, Tracker, WandbSettings, collapsed, default_wandb_mode,
                                 git_commit, norm_guard, stability, wandb_settings)
from test_distributed import P, ROOT, deepspeed, ds_config, read_metrics, train_args


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
        deepspeed("train.py", *train_args(tiny_model_dir, ds, out, wandb_project="p", wandb_mode="offline",
                                          wandb_group="g", wandb_tags="a,b", peak_tflops=1))
    listener.sock.close()
    return out, ds, wandb_root, listener


@pytest.mark.distributed
def test_one_offline_run_from_rank_zero_no_network(wandb_run):
    out, _, wandb_root, listener = wandb_run
    runs = sorted(p.name for p in wandb_root.iterdir() if "run-" in p.name and p.is_dir())
    assert len(runs) == 1 and runs[0].startswith("offline-run-"), runs  # none from rank 1
    assert not (out / "wandb").exists()  # WANDB_DIR wins over the output dir
    assert listener.connections == 0, "offline mode must not touch the network"
    exits = [r["exit"] for r in read_wandb(wandb_root / runs[0]) if r["type"] == "exit"]
    assert exits == [{"exit_code": 0, "runtime": exits[0]["runtime"]}]


@pytest.mark.distributed
def test_wandb_config_and_history_mirror_metrics_jsonl(wandb_run):
    out, ds, wandb_root, _ = wandb_run
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
        WandbSettings("p", "offline", "tiny_pl20_init-random_s0", None, ("a", "b"))
    assert settings(["--wandb_project=p", "--wandb_mode=disabled"]) is None
    assert settings(["--wandb_mode=offline", "--model=google/mt5-xl", "--prompt_length=100", "--prompt_init=labels"],
                    {"WANDB_PROJECT": "env-p"}) == WandbSettings("env-p", "offline", "mt5-xl_pl100_init-labels_s0")
    assert settings([]) is None  # W&B off: nothing resolved
    assert settings(["--wandb_project=p"], {"WANDB_MODE": "offline"}).mode == "offline"


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
