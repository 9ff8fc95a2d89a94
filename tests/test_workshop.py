"""docs/workshop.md's exercises run: each command of each exercise, read from the document, at a
tiny size. They start from the main job's run folder, so here from the one `bash run.sh --quick`
folder the session shares (conftest.quick_run): out/default becomes that folder, any other out/
folder a temporary one, config/quick.py follows config/cpu_tiny.py, and the flags below shrink
whatever the script has of them."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKSHOP = os.path.join(ROOT, "docs", "workshop.md")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_docs import config_fields  # noqa: E402

# appended to a command for each key its script's Config has: the tiny size
TINY = {
    "max_iters": 2,
    "rl_steps": 1,
    "questions": 1,
    "rollouts": 1,
    "max_problems": 4,
    "iters": 5,
    "controls": 1,
    "eval_problems": 4,
    "threads": 1,
}


def exercises():
    """[(title, [command lines])] of docs/workshop.md: each `## ` section's bash blocks, a
    continued line joined, comments dropped."""
    text = open(WORKSHOP, encoding="utf-8").read()
    found = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        blocks = re.findall(r"^```bash\n(.*?)^```", section, flags=re.M | re.S)
        lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
        commands = [line.split(" #")[0].strip() for line in lines]
        commands = [c for c in commands if c and not c.startswith("#")]
        if commands:
            found.append((title, commands))
    return found


def tiny(command, run, scratch):
    """The command at the tiny size, on the quick run folder."""
    args = shlex.split(command)
    script = next(a for a in args if a.endswith(".py") and not a.startswith("config/"))
    fields = config_fields(script) or set()
    out = []
    for a in args:
        a = a.replace("out/default", "\0")
        a = re.sub(r"(?<![\w/])out/", scratch + "/", a).replace("\0", run)
        out.append(a)
        if a == "config/cpu_tiny.py":
            out.append("config/quick.py")
    return out + [f"--{k}={v}" for k, v in TINY.items() if k in fields]


def test_the_workshop_has_four_to_six_exercises():
    assert 4 <= len(exercises()) <= 6, [title for title, _ in exercises()]


@pytest.mark.parametrize("title", [title for title, _ in exercises()])
def test_exercise_runs(title, quick_run, tmp_path):
    commands = dict(exercises())[title]
    for command in commands:
        assert command.startswith("python "), f"{title}: `{command}` is not a python command"
        argv = tiny(command, str(quick_run), str(tmp_path))
        result = subprocess.run(
            [sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{title}: {' '.join(argv)}\n{result.stderr[-2000:]}"
