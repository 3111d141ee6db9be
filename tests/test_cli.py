import subprocess
import sys

import pytest

import autobatch
from autobatch.cli import main


@pytest.mark.slow
def test_version_and_help_from_the_console_script() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "autobatch", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"autobatch {autobatch.__version__}"
    help_text = subprocess.run(
        [sys.executable, "-m", "autobatch", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: autobatch" in help_text


def test_main_without_a_command_prints_help(capsys) -> None:
    assert main([]) == 2
    assert "usage: autobatch" in capsys.readouterr().out


@pytest.mark.slow
def test_fit_command_trains_a_built_in_example_and_writes_plot_and_history(tmp_path, capsys) -> None:
    import json

    code = main(["fit", "--example", "synthetic", "--max-steps", "40", "--no-progress",
                 "--out", str(tmp_path), "--max-lr-factor", "none"])
    out = capsys.readouterr().out
    assert code == 0
    assert "steps=40" in out and "batch size: 16" in out
    history = json.loads((tmp_path / "synthetic-gns.json").read_text())
    assert len(history["history"]) == 40 and history["steps"] == 40
    assert (tmp_path / "synthetic-gns.png").stat().st_size > 10_000
