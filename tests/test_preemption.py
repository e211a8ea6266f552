"""softprompt.preemption: /proc parsing, finding launcher ancestors, and a rank that notices its
(fake) launcher exit, with real processes. The 2-rank runs are in test_checkpoint.py."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from softprompt.preemption import Preemption, Stat, find_launchers, is_launcher, parse_stat, read_stat

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# A rank: watches its launchers, says how many it found, exits 75 once a stop is requested.
RANK = textwrap.dedent("""
    import sys, time
    from softprompt.preemption import Preemption
    p = Preemption()
    print(len(p.launchers), flush=True)
    while not p.requested:
        time.sleep(0.01)
    sys.exit(75)
""")


def stat_line(pid=7, comm="python", state="S", ppid=1, start=100) -> str:
    rest = [state, ppid, *range(5, 22), start, *range(23, 53)]  # fields 3..52 of proc(5)
    return f"{pid} ({comm}) " + " ".join(map(str, rest)) + "\n"


def test_parse_stat_takes_the_fields_after_the_last_parenthesis():
    assert parse_stat(stat_line(comm="a) b (c) S 9", state="R", ppid=42, start=12345)) == Stat("R", 42, 12345)


def test_parse_stat_of_this_process():
    stat = parse_stat(Path("/proc/self/stat").read_text())
    assert stat.ppid == os.getppid() and stat.state == "R"
    assert stat.start >= parse_stat(Path(f"/proc/{os.getppid()}/stat").read_text()).start


@pytest.mark.parametrize("argv, expected", [
    (["/venv/bin/python3", "/venv/bin/deepspeed", "--num_gpus", "2", "train.py"], True),
    (["/venv/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "train.py"], True),
    (["python", "-m", "deepspeed.launcher.runner", "train.py"], True),
    (["python", "-u", "train.py", "--local_rank=0"], False),
    (["python", "train.py", "--output_dir", "deepspeed"], False),
    (["bash", "-c", "deepspeed train.py", ""], False),
    (["slurmstepd: [12.0]", ""], False),
    (["python", "-m", "pytest", "-m", "deepspeed.launcher"], False),
])
def test_is_launcher(argv, expected):
    assert is_launcher(argv) == expected


def fake_proc(root: Path, chain: list[tuple[int, int, str]]) -> None:
    """A /proc with `self` and its ancestors: (pid, start, cmdline) from this process upwards."""
    for i, (pid, start, cmd) in enumerate(chain):
        ppid = chain[i + 1][0] if i + 1 < len(chain) else 1
        for name in ("self", str(pid)) if i == 0 else (str(pid),):
            (root / name).mkdir()
            (root / name / "stat").write_text(stat_line(pid, Path(cmd.split()[0]).name, "S", ppid, start))
            (root / name / "cmdline").write_bytes(cmd.replace(" ", "\0").encode() + b"\0")


def test_find_launchers_walks_up_to_init(tmp_path):
    fake_proc(tmp_path, [(50, 900, "python -u train.py --local_rank=0"),
                         (40, 800, "python -u -m deepspeed.launcher.launch --world_info=x train.py"),
                         (30, 700, "python /venv/bin/deepspeed train.py"), (20, 600, "bash"), (10, 500, "sshd")])
    assert [pid for pid, _ in find_launchers(str(tmp_path))] == [40, 30]


def test_find_launchers_stops_at_a_parent_younger_than_its_child(tmp_path):
    # PID 30 started after its "child" 40: the runner that was 30 has exited and 30 is another process.
    fake_proc(tmp_path, [(50, 900, "python -u train.py --local_rank=0"),
                         (40, 800, "python -u -m deepspeed.launcher.launch --world_info=x train.py"),
                         (30, 950, "python /venv/bin/deepspeed train.py")])
    assert [pid for pid, _ in find_launchers(str(tmp_path))] == [40]


def test_read_stat_reports_a_zombie_and_a_reaped_process_as_exited():
    proc = subprocess.Popen(["sleep", "60"])
    fd = os.open(f"/proc/{proc.pid}/stat", os.O_RDONLY)
    try:
        assert read_stat(fd).ppid == os.getpid()
        proc.kill()
        wait_until(lambda: "Z" in Path(f"/proc/{proc.pid}/stat").read_text().split(")")[-1][:3])
        assert read_stat(fd) is None  # a zombie: not reaped yet
        proc.wait()
        assert read_stat(fd) is None  # reaped: the read fails
    finally:
        os.close(fd)


def wait_until(check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def state(pid: int) -> str:
    try:
        return parse_stat(Path(f"/proc/{pid}/stat").read_text()).state
    except OSError:
        return "X"


def start_tree(tmp_path: Path, middle: bool) -> tuple[subprocess.Popen, Path, Path]:
    """A fake runner, an executable named `deepspeed`, that starts RANK, with a plain Python process
    in between when `middle` (it writes the rank's exit code to a file). Returns the runner's Popen,
    the rank's output and that exit code file."""
    out, code = tmp_path / "rank.out", tmp_path / "rank.code"
    cmd = [sys.executable, "-c", RANK]
    if middle:
        cmd = [sys.executable, "-c", "import pathlib, subprocess, sys; "
               f"pathlib.Path({str(code)!r}).write_text(str(subprocess.call({cmd!r})))"]
    runner = tmp_path / "deepspeed"
    runner.write_text(f"#!{sys.executable}\nimport subprocess, time\n"
                      f"subprocess.Popen({cmd!r}, stdout=open({str(out)!r}, 'w'))\ntime.sleep(600)\n")
    runner.chmod(0o755)
    proc = subprocess.Popen([str(runner)], env=ENV, start_new_session=True)
    wait_until(lambda: out.exists() and out.read_text().strip())
    return proc, out, code


@pytest.mark.parametrize("reap", [False, True], ids=["runner_zombie", "runner_reaped"])
def test_rank_stops_when_its_launcher_parent_exits(tmp_path, reap):
    runner, out, _ = start_tree(tmp_path, middle=False)
    try:
        assert out.read_text().split() == ["1"]
        [rank] = [int(p) for p in Path(f"/proc/{runner.pid}/task/{runner.pid}/children").read_text().split()]
        time.sleep(0.3)
        assert state(rank) in "RS"  # still watching
        runner.send_signal(signal.SIGTERM)  # the runner alone, as when only the launcher is signalled
        if reap:
            runner.wait()
        wait_until(lambda: state(rank) in "ZX", 10)
        assert out.read_text().split() == ["1"]  # stopped without an error
    finally:
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()


def test_rank_stops_when_a_launcher_grandparent_exits(tmp_path):
    runner, out, code = start_tree(tmp_path, middle=True)
    try:
        assert out.read_text().split() == ["1"]  # the runner; the plain Python process in between is not one
        runner.send_signal(signal.SIGTERM)
        wait_until(code.exists, 10)
        assert code.read_text() == "75"
    finally:
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_requests_a_stop_and_no_launcher_is_watched(sig):
    rank = subprocess.Popen([sys.executable, "-c", RANK], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline() == "0\n"  # started by pytest: no launcher above it
        time.sleep(0.2)
        assert rank.poll() is None
        rank.send_signal(sig)
        assert rank.wait(timeout=10) == 75
    finally:
        rank.kill()
        rank.wait()


def test_a_check_reads_only_the_open_stat_files(monkeypatch):
    """What the loop pays per step: one pread per watched launcher, no open, no /proc walk."""
    import builtins
    import timeit

    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    fds = [os.open(f"/proc/{pid}/stat", os.O_RDONLY) for pid in (os.getppid(), os.getpid())]
    try:
        preemption = Preemption(launchers=[(0, fd) for fd in fds])
        assert not preemption.requested

        def refuse(*args, **kwargs):
            raise AssertionError("a check opened a file")
        monkeypatch.setattr(os, "open", refuse)
        monkeypatch.setattr(builtins, "open", refuse)
        per_check = min(timeit.repeat(lambda: preemption.requested, number=1000, repeat=5)) / 1000
        assert not preemption.requested
        print(f"{per_check * 1e6:.1f} us per check with 2 watched processes")
        assert per_check < 100e-6
    finally:
        monkeypatch.undo()
        for fd in fds:
            os.close(fd)
        for s, h in handlers.items():
            signal.signal(s, h)
