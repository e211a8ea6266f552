"""launcher.sweep: the grid (pure), sweep.json and the sbatch command, bad input = one line + exit 2."""

import json
import shlex
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
                                 "--seed", "1", "--prompt_depth", "input", "--quiet", "--max_steps", "5"]
    assert {(t["lr"], t["prompt_depth"]) for t in tasks} == {(None, "input")}  # no lr axis: the JSON's lr


def test_lr_and_depth_axes(tmp_path):
    tasks = sweep.expand(["tiny"], ["random"], [5], [0, 1], tmp_path, [], lrs=[0.3, 0.01], depths=["input", "all"])
    assert [(t["prompt_depth"], t["lr"], t["seed"]) for t in tasks] == [
        (d, lr, s) for d in ("input", "all") for lr in (0.3, 0.01) for s in (0, 1)]
    assert [Path(t["output_dir"]).name for t in tasks[:3]] == [
        "000_tiny_random_len5_lr0.3_input_seed0", "001_tiny_random_len5_lr0.3_input_seed1",
        "002_tiny_random_len5_lr0.01_input_seed0"]
    assert tasks[5]["args"] == ["--model", "tiny", "--prompt_init", "random", "--prompt_length", "5", "--seed", "1",
                                "--lr", "0.3", "--prompt_depth", "all", "--quiet"]
    args, parsed = sweep.parse(["--lengths", "5", "--seeds", "0,1", "--lrs", "0.3,1e-2", "--depths", "input,all",
                                "--output_dir", str(tmp_path)])
    assert parsed == tasks and args.models == "tiny"
    one = sweep.expand(["tiny"], ["random"], [5], [0], tmp_path, [], lrs=[0.1], depths=["encoder"])
    assert Path(one[0]["output_dir"]).name == "000_tiny_random_len5_seed0"  # one value is no axis: not in the name


def test_dry_run_writes_sweep_json_and_prints_one_array(tmp_path, capsys):
    out = tmp_path / "sw"
    assert sweep.main(["--lengths", "1,5,20", "--seeds", "0,1", "--models", "tiny", "--inits", "random,vocab",
                       "--output_dir", str(out), "--max_concurrent", "4", "--dry_run", "--", "--max_steps", "3"]) == 0
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
    (["--lengths", "1", "--seeds", "0", "--lrs", "0.1,fast"], "--lrs: '0.1,fast' is not a list of numbers"),
    (["--lengths", "1", "--seeds", "0", "--lrs", "0.1,0"], "--lrs must be > 0"),
    (["--lengths", "1", "--seeds", "0", "--depths", "input,decoder"], "unknown prompt depth 'decoder'"),
    (["--lengths", "1", "--seeds", "0", "--", "--lr=0.1"], "--lr is set by the sweep"),
    (["--lengths", "1", "--seeds", "0", "--", "--prompt_depth", "all"], "--prompt_depth is set by the sweep"),
    (["--lengths", "0,5", "--seeds", "0", "--models", "tiny"], "--lengths must be > 0"),
    (["--lengths", "1", "--seeds", "0,0", "--models", "tiny"], "repeats a value"),
    (["--lengths", "1", "--seeds", "0", "--models", "tiny", "--inits", "random,zeros"], "unknown init 'zeros'"),
    (["--lengths", "1", "--seeds", "0", "--models", "tiny", "--", "--seed", "3"], "--seed is set by the sweep"),
    (["--lengths", "1", "--models", "tiny"], "required: --seeds"),
    (["--lengths", "1", "--seeds", "0", "--models", "tiny", "--jobs", "2"], "is for --local runs"),
    (["--lengths", "1", "--seeds", "0", "--models", "tiny", "--local", "--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "sw"
    assert sweep.main(["--output_dir", str(out), *argv]) == 2
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


def test_dry_run_commands_are_shell_quoted(tmp_path, capsys, monkeypatch):
    """Each printed command, pasted into a shell, runs as that one command with those arguments."""
    out = tmp_path / "my sweep"
    evil = ["--wandb_tags", "$(touch pwned)", "--wandb_run_name", "a b;c"]
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["--lengths", "1", "--seeds", "0", "--output_dir", str(out), "--dry_run", "--", *evil]) == 0
    sbatch = capsys.readouterr().out.splitlines()[-1]
    assert shlex.split(sbatch)[-1] == str(out / "sweep.json")
    assert sweep.main(["--lengths", "1", "--seeds", "0", "--output_dir", str(out), "--dry_run", "--local", "--",
                       *evil]) == 0
    local = capsys.readouterr().out.splitlines()[-1]
    task = json.loads((out / "sweep.json").read_text())["tasks"][0]
    assert shlex.split(local) == [sys.executable, "train.py", *task["args"], "--output_dir", task["output_dir"],
                                  "--resume", "auto"]
    subprocess.run(["bash", "-c", f"echo {local}"], check=True, capture_output=True)
    assert not (tmp_path / "pwned").exists()


def test_former_out_flag_still_works(tmp_path, capsys):
    assert sweep.main(["--lengths", "1", "--seeds", "0", "--out", str(tmp_path), "--dry_run"]) == 0
    assert (tmp_path / "sweep.json").exists() and "--out is now --output_dir" in capsys.readouterr().err
