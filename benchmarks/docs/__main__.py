"""``python -m benchmarks.docs``: regenerate (or ``--check``) the benchmark pages in docs/."""

from __future__ import annotations

import sys

from benchmarks.docs import main

sys.exit(main())
