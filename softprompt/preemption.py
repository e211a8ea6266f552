"""When to stop early: a signal, or the launcher that started this rank going away.

Either only sets a flag. The training loop reads `Preemption.requested` once per step, agrees over
ranks (metrics.any_rank), saves a checkpoint and returns; train.py then exits 75
(checkpoint.EXIT_REQUEUE) and a scheduler script requeues the run, which resumes from the checkpoint.

Signals: SIGUSR1 and SIGTERM, what Slurm sends before a time limit (--signal) and on preemption.

The launcher: the `deepspeed` runner installs no SIGTERM handler when it runs on one node, so a
SIGTERM to it alone (a terminal closed, a scheduler that signals only the process it started) ends it
at once and leaves launch.py and the ranks training on, orphaned, with nobody left to report or stop
them. So each rank finds the deepspeed launchers among its ancestors once, at start, and treats the
exit of any of them like a SIGTERM. Ranks started by srun or `python train.py` have none: nothing is
watched. A launcher that exits before the trainer starts watching (`install`) is missed.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

# Field 22 of /proc/PID/stat, counted from the state (field 3) after the command name.
_START_FIELD = 22 - 3


@dataclass(frozen=True)
class Stat:
    state: str  # R, S, D, ...; Z (zombie) and X (dead) have exited
    ppid: int
    start: int  # clock ticks after boot


def parse_stat(text: str) -> Stat:
    """A /proc/PID/stat line. The command name in parentheses may itself hold spaces and ')'."""
    fields = text[text.rindex(")") + 2:].split()
    return Stat(fields[0], int(fields[1]), int(fields[_START_FIELD]))


def is_launcher(argv: list[str]) -> bool:
    """`python -m deepspeed.launcher.runner|launch`, or the `deepspeed` script (run by its interpreter)."""
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    return module.startswith("deepspeed.launcher") or any(os.path.basename(a) == "deepspeed" for a in argv[:2])


def read_stat(fd: int) -> Stat | None:
    """The process's stat through an open /proc/PID/stat; None once it has exited. An open stat file
    stays tied to its process: after that process is reaped, reading fails (ESRCH) even if its PID has
    been reused, so one pread is a complete check."""
    try:
        stat = parse_stat(os.pread(fd, 4096, 0).decode())
    except OSError:
        return None
    return None if stat.state in "ZX" else stat


def find_launchers(proc: str = "/proc", max_depth: int = 64) -> list[tuple[int, int]]:
    """(pid, open stat fd) of every deepspeed launcher among this process's ancestors.

    The walk reads each parent's PID from its child's stat and only then opens the parent's: should
    the parent exit and its PID be reused in between, the process opened started after its supposed
    child, and the walk stops there (a parent always starts before its children)."""
    found = []
    with open(f"{proc}/self/stat") as f:
        child = parse_stat(f.read())
    for _ in range(max_depth):
        pid = child.ppid
        if pid <= 1:
            break
        try:
            fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY)
            with open(f"{proc}/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            break
        stat = read_stat(fd)
        if stat is None or stat.start > child.start:
            os.close(fd)
            break
        if is_launcher(argv):
            found.append((pid, fd))
        else:
            os.close(fd)
        child = stat
    return found


class Preemption:
    """SIGUSR1 / SIGTERM, or the exit of a deepspeed launcher above this rank, request a stop.

    `requested` costs one pread per watched launcher (none outside the deepspeed launcher) while no
    stop has been requested, and nothing after."""

    def __init__(self, launchers: list[tuple[int, int]] | None = None):
        self._stop = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)
        self.launchers = find_launchers() if launchers is None else launchers

    def _handle(self, signum, frame):
        self._stop = True

    @property
    def requested(self) -> bool:
        if not self._stop:
            for pid, fd in self.launchers:
                if read_stat(fd) is None:
                    print(f"rank {os.environ.get('RANK', '0')}: the deepspeed launcher (pid {pid}) has exited: "
                          "stopping with a checkpoint", file=sys.stderr, flush=True)
                    self._stop = True
                    break
        return self._stop


_installed: list[Preemption] = []


def install() -> Preemption:
    """The process's one Preemption, created (its signal handlers installed) on the first call. train.py calls
    it before its slow imports, so that a signal during them is not lost."""
    if not _installed:
        _installed.append(Preemption())
    return _installed[0]
