"""Every command-line entry point: --help exits 0, and the entry points spell shared flags alike."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {  # -> whether it takes an output directory
    "train.py": True, "launcher.sweep": True, "launcher.aggregate": True, "benchmarks.bench": False,
    "benchmarks.scaling": True, "benchmarks.quality": True, "softprompt.predict": False,
    "softprompt.export": False,
}
# Built with launcher.args.HelpFormatter: each default shown once, none for flags without one.
ONE_DEFAULT_EACH = ("train.py", "launcher.sweep", "launcher.aggregate", "benchmarks.bench", "benchmarks.scaling",
                    "benchmarks.quality", "softprompt.predict", "softprompt.export")


@pytest.fixture(scope="module")
def helps():
    """Each entry point's --help output, all started at once (each imports torch or deepspeed)."""
    procs = {name: subprocess.Popen([sys.executable, *([name] if name.endswith(".py") else ["-m", name]), "--help"],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ENTRY_POINTS}
    return {name: proc.communicate(timeout=300) + (proc.returncode,) for name, proc in procs.items()}


def option_blocks(text: str) -> dict[str, str]:
    """Option -> its help entry (the lines from its '  --flag' line to the next option's)."""
    blocks, current = {}, None
    for line in text.splitlines():
        if m := re.match(r"  (--?\w+)", line):
            current = m[1]
            blocks[current] = ""
        if current:
            blocks[current] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_exits_0_and_shared_flags_agree(helps, name):
    out, err, rc = helps[name]
    assert rc == 0 and out.startswith("usage:"), err
    assert not re.search(r"--out\b", out)  # train.py's --output_dir everywhere; --out is only a hidden alias
    assert not re.search(r"--batch\b", out)  # --batch_size, --eval_batch_size
    assert ("--output_dir" in out) == ENTRY_POINTS[name]
    blocks = option_blocks(out)
    for flag in ("--model", "--models"):
        if flag in blocks:
            assert "(default: tiny)" in blocks[flag], blocks[flag]
    assert "[default" not in out


@pytest.mark.parametrize("name", ONE_DEFAULT_EACH)
def test_help_shows_each_default_and_the_choices_once(helps, name):
    blocks = option_blocks(helps[name][0])
    for flag, text in blocks.items():
        assert re.sub(r"--?\w+( [A-Z_]+)?,?", "", text).strip(), f"{flag} has no help"
        assert text.count("default") <= 1, text
        assert "(default: None)" not in text and "(default: False)" not in text, text
    if name == "benchmarks.bench":
        assert "{mt5-small," in blocks["--shape"] and blocks["--dtype"].count("{fp32,bf16}") == 1
    if name in ("launcher.aggregate", "benchmarks.quality"):
        assert "from png, pdf, svg (default: png)" in blocks["--format"]
