"""A real SIGTERM or SIGINT sent while fit's final evaluation runs (in a subprocess,
tests/helpers/final_eval_worker.py): the run completes, ``last.pt`` holds the final step, then
the signal ends the process as it would between two steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import autobatch
from autobatch.train.checkpoint import load_checkpoint
from tests.helpers import final_eval_worker as worker

_WORKER = Path(worker.__file__)
_ROOT = Path(autobatch.__file__).resolve().parents[1]  # the subprocess imports the autobatch tested here


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_during_the_final_evaluation_is_honoured_after_the_final_save(tmp_path, sig) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(_WORKER), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "evaluating").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.01)
        proc.send_signal(sig)
        time.sleep(0.2)  # the handler runs in the evaluation's wait
        (tmp_path / "go").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGTERM:  # Preempted: status 143, no traceback
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, (proc.returncode, err)
    else:  # KeyboardInterrupt, uncaught: Python ends itself with SIGINT
        assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in err, (proc.returncode, err)
    assert "returned" not in out
    assert load_checkpoint(tmp_path)["result"]["steps"] == worker.STEPS  # the run is complete and saved
