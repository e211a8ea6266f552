"""launcher.sweep: the grid (pure), sweep.json and the sbatch command, bad input = one line + exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import sweep

ROOT = Path(__file__).resolve().parents[1]


def test_expand_is_the_full_grid_seeds_innermost(tmp_path):
    tasks = sweep.expand(["tiny", "google/mt5-xl"], ["random", "labels"], [1, 20], [0, 1, 2], tmp_path,
                         ["--max_steps", "5"])
    assert len(tasks) == 2 * 2 * 2 * 3
    assert [(t["model"], t["init"], t["prompt_length"], t["seed"]) for t in tasks[:4]] == [
        ("tiny", "random", 1, 0), ("tiny", "random", 1, 1), ("tiny", "random", 1, 2), ("tiny", "random", 20, 0)]
    assert tasks[-1]["model"] == "google/mt5-xl" and tasks[-1]["init"] == "labels"
    assert len({t["output_dir"] for t in tasks}) == len(tasks)
    assert tasks[13]["output_dir"] == str(tmp_path / "runs" / "013_mt5-xl_random_len1_seed1")
    assert tasks[13]["args"] == ["--model", "google/mt5-xl", "--prompt_init", "random", "--prompt_length", "1",
                                 "--seed", "1", "--quiet", "--max_steps", "5"]


def test_dry_run_writes_sweep_json_and_prints_one_array(tmp_path, capsys):
    out = tmp_path / "sw"
    assert sweep.main(["--lengths", "1,5,20", "--seeds", "0,1", "--models", "tiny", "--inits", "random,vocab",
                       "--out", str(out), "--max_concurrent", "4", "--dry_run", "--", "--max_steps", "3"]) == 0
    tasks = json.loads((out / "sweep.json").read_text())["tasks"]
    assert len(tasks) == 12 and all(t["args"][-2:] == ["--max_steps", "3"] for t in tasks)
    cmd = capsys.readouterr().out.splitlines()[-1].split()
    assert cmd[:3] == ["sbatch", "--parsable", "--array=0-11%4"]
    assert cmd[-2:] == [str(ROOT / "slurm/sweep.sbatch"), str(out / "sweep.json")]
    assert not (out / "logs").exists()  # nothing submitted


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "", "--seeds", "0", "--models", "tiny"], "--lengths needs a comma-separated list"),
    (["--lengths", "1,,5", "--seeds", "0", "--models", "tiny"], "--lengths needs a comma-separated list"),
    (["--lengths", "1,five", "--seeds", "0", "--models", "tiny"], "not a list of integers"),
    (["--lengths", "0,5", "--seeds", "0", "--models", "tiny"], "--lengths must be > 0"),
    (["--lengths", "1", "--seeds", "0,0", "--models", "tiny"], "repeats a value"),
    (["--lengths", "1", "--seeds", "0", "--models", "tiny", "--inits", "random,zeros"], "unknown init 'zeros'"),
    (["--lengths", "1", "--seeds", "0", "--models", "tiny", "--", "--seed", "3"], "--seed is set by the sweep"),
    (["--lengths", "1", "--seeds", "0"], "required: --models"),
    (["--lengths", "1", "--seeds", "0", "--models", "tiny", "--jobs", "2"], "is for --local runs"),
    (["--lengths", "1", "--seeds", "0", "--models", "tiny", "--local", "--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "sw"
    assert sweep.main(["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not out.exists()


@pytest.mark.parametrize("jobs", [1, 2])
def test_local_runs_skip_finished_tasks_and_report_failed_ones(tmp_path, capfd, jobs):
    """train.py rejects the flag in 3 s; with --jobs 2 each task's output goes to its own log."""
    tasks = [{"model": "tiny", "init": "random", "prompt_length": 1, "seed": s, "args": ["--no_such_flag"],
              "output_dir": str(tmp_path / "runs" / f"run{s}")} for s in range(4)]
    (tmp_path / "runs" / "run2").mkdir(parents=True)
    (tmp_path / "runs" / "run2" / "results.json").write_text("{}")
    assert sweep.run_local(tasks, True) == 0  # --dry_run: the commands, each resuming its own checkpoint
    assert capfd.readouterr().out.count(" --resume auto\n") == len(tasks)
    assert sweep.run_local(tasks, False, jobs, tmp_path / "logs") == 1
    out, err = capfd.readouterr()
    assert "task 2: done already" in out and "error: 3 of 4 tasks failed: [0, 1, 3]" in err
    logs = sorted(tmp_path.glob("logs/*.log"))
    if jobs == 1:
        assert err.count("unrecognized arguments: --no_such_flag") == 3 and not logs
    else:
        assert [p.name for p in logs] == ["run0.log", "run1.log", "run3.log"]
        assert all("unrecognized arguments: --no_such_flag" in p.read_text() for p in logs)


@pytest.mark.parametrize("module", ["launcher.sweep", "launcher.aggregate"])
def test_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "usage:" in proc.stdout
