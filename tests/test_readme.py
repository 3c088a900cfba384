"""The README's quick try works as pasted, after a (small) `make demo`."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

from tests.conftest import run_while_advancing

REPOSITORY = Path(__file__).parent.parent


def quick_try() -> str:
    readme = (REPOSITORY / "README.md").read_text()
    section = readme.split("### Quick try without Nuclio", 1)[1]
    return re.search(r"```\n(.*?)```", section, re.S).group(1)


def test_the_quick_try_serves_the_demo_model_and_answers_a_held_out_frame(tmp_path):
    from preannotate.demo import run_demo

    run_demo(tmp_path / "demo-output", steps=3, frames=20, held_out=4, progress=False, say=lambda _: None,
             hyperparameters="batch-size=4; num-validations=1")
    (tmp_path / ".venv").symlink_to(sys.prefix)  # the environment running the tests (make's .venv)
    with socket.socket() as probe:  # the README's port, unless something here uses it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = quick_try().replace("8765", str(port))
    done = run_while_advancing(["bash", "-c", "set -e\n" + script], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    detections, models = [json.loads(line) for line in done.stdout.splitlines() if line.startswith(("[", "{"))]
    assert isinstance(detections, list) and all({"label", "points", "confidence"} <= set(d) for d in detections)
    assert models["serving"]["name"] == "demo" and models["serving"]["version"] == 1


def test_the_readme_says_where_the_command_is():
    readme = (REPOSITORY / "README.md").read_text()
    assert "`. .venv/bin/activate`" in readme and "`.venv/bin/preannotate`" in readme


def test_the_readme_dry_runs_work_as_written_on_a_fresh_machine(tmp_path, monkeypatch, capsys):
    """A dry run needs no store (and makes none): its commands work before anything was trained."""
    import tempfile

    from preannotate.cli import main as cli

    readme = (REPOSITORY / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```\w*\n(.*?)```", readme, re.S))
    commands = [line.partition("#")[0].split() for line in blocks.splitlines()
                if line.startswith("preannotate ") and "--dry-run" in line and not re.search(r"[$<\[\\]", line)]
    assert commands, "the README shows a dry run"
    monkeypatch.setenv("PREANNOTATE_MODEL_STORE", str(tmp_path / "store"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for command in commands:
        assert cli(command[1:]) == 0, (command, capsys.readouterr().err)
        assert "nuctl deploy" in capsys.readouterr().out
    assert not (tmp_path / "store").exists()
