import subprocess
import sys

import autobatch
from autobatch.cli import main


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
