"""How a data-parallel test worker ends (imported by the worker scripts, which run with this
directory first on ``sys.path``)."""

import os
import sys

from autobatch.train.distributed import _destroy_if_initialized


def finish(code: int = 0) -> None:
    """Tear the gloo group down while every rank is still here, flush, and leave without
    interpreter finalisation.

    The worker's results are written by then. Left to interpreter exit, gloo's worker threads
    can still hold work whose destruction needs the GIL of an interpreter being torn down: a
    rank aborted that way in CI ("terminate called without an active exception", exit -6)
    after a passing run, twice, once after this explicit teardown (a torch-side atexit
    teardown, pytorch PR 179291, was proposed and abandoned). ``os._exit`` skips that
    finalisation; the exit code stays the worker's.
    """
    _destroy_if_initialized()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
