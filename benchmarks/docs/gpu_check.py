"""Page for ``gpu_check.json``: every CUDA code path, exercised once on a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import Page, table

written_for = "2b40a26884e5"  # the commentary was checked against these results

TEMPLATE = """\
The test suite runs on CPU; `benchmarks/gpu_check.py` runs each CUDA-only path of autobatch
once on a GPU: the memory probe's real steps running out of device memory and backing off,
fp16 with a GradScaler skipping inf steps, bf16 autocast, DataLoader workers with pinned
memory, a one-process nccl group, and a checkpoint resume with CUDA RNG states. Every fit in
it is given `device=torch.device("cuda")` without an index, as users write it.

```bash
python benchmarks/gpu_check.py   # about {seconds:.0f} s on {device} (torch {torch}, CUDA {cuda})
```

## Results

{table}

## What its first run on a GPU found

The first run on this machine failed five of the six checks, on two bugs that the CPU suite
could not see; both are fixed, and each now has a CPU test:

- `fit(device="cuda")` with the model on `cuda:0` stopped in the memory probe's same-device
  check, since `torch.device("cuda") != torch.device("cuda:0")`. Devices given by the user now
  get their index (`autobatch.data.canonical_device`) before any comparison
  (`tests/test_data.py::test_canonical_device_gives_the_index_tensors_report`).
- With `precision="bf16"` or `"fp16"`, fit's memory probe measured an fp32 step. It now runs
  the probed steps under the same autocast (`probe_memory(precision=...)`), and the estimate
  equals a live-storage count of a real bf16 step
  (`tests/test_memory.py::test_a_mixed_precision_step_is_probed_under_autocast`).

The probe check's budget claims twice the memory the device is limited to, so the estimate
overshoots on purpose and every step above the limit has to fail for real before the probe
backs off.
"""


def render(data: Any, source: Path) -> Page:
    rows = [[r["check"], r["status"], f"{r['seconds']:.1f} s", r["detail"]] for r in data["rows"]]
    passed = sum(r["status"] == "pass" for r in data["rows"])
    body = TEMPLATE.format(seconds=data["total_seconds"], device=data["device"], torch=data["torch"],
                           cuda=data.get("cuda", "?"), table=table(["check", "status", "time", "detail"], rows, "llrl"))
    summary = f"{passed} of {len(data['rows'])} CUDA checks pass on {data['device']}"
    return Page("GPU check: the CUDA code paths", summary, body, written_for)
