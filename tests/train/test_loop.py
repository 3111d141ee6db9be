"""End-to-end behaviour of autobatch.fit on small problems (seconds each)."""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

import autobatch
from autobatch.policies import BatchSizePolicy, PolicyContext
from autobatch.train import loop
from autobatch.train.callbacks import Callback, StopAtTarget
from autobatch.train.controller import BatchSizeController
from autobatch.train.distributed import DistInfo, FlatGradientBuffer
from autobatch.train.step_norms import StepNormMeter


class IndexedData(Dataset):
    """(x, y) where x[0] carries the example's index, so a model can log what it saw."""

    def __init__(self, n: int = 200, d: int = 4) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, d, generator=g)
        self.x[:, 0] = torch.arange(n, dtype=torch.float32)
        self.y = torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Recorder(nn.Module):
    """A linear model that records the example indices of every training forward."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d - 1, 1)
        self.seen: list[int] = []

    def forward(self, x):
        if self.training:
            self.seen.extend(int(i) for i in x[:, 0])
        return self.lin(x[:, 1:])


class Schedule(BatchSizePolicy):
    """Proposes a fixed sequence of sizes, one per decision (a known answer)."""

    def __init__(self, sizes):
        self.sizes, self.i = list(sizes), 0

    def propose(self, ctx: PolicyContext) -> int:
        b = self.sizes[min(self.i, len(self.sizes) - 1)]
        self.i += 1
        return b

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state) -> None:
        self.i = state["i"]


def test_gns_policy_grows_the_batch_and_history_is_consistent(tmp_path, regression, mse) -> None:
    x, y = regression(n=2048, noise=3.0)
    model = nn.Linear(8, 1)
    res = autobatch.fit(model, (x, y), loss_fn=mse, val_data=(x[:256], y[:256]), lr=0.02,
                        epochs=3, initial_batch_size=16, decide_every=5, policy="gns", progress=False)
    h = res.history
    assert res.steps == len(h) and res.samples == sum(r.examples for r in h)
    assert all(r.examples <= r.batch_size for r in h)
    assert res.samples == 3 * 2048 and res.stopped_by == "epochs"
    assert all(r.micro_batch_size * r.accum_steps >= r.examples for r in h)
    # The noise grows relative to |G|^2 as the fit converges, so B must have grown.
    assert max(r.batch_size for r in h) >= 64
    assert res.final_metrics["val_loss"] < mse(torch.zeros_like(y[:256]), y[:256]).item()
    res.to_csv(tmp_path / "h.csv")
    data = json.loads(res.to_json(tmp_path / "h.json").read_text())
    assert len(data["history"]) == res.steps
    assert (tmp_path / "h.csv").read_text().count("\n") == res.steps + 1
    assert res.plot(tmp_path / "p.png").stat().st_size > 10_000


def test_no_sample_skipped_or_repeated_when_b_changes_mid_epoch(mse) -> None:
    data = IndexedData(n=200)
    model = Recorder()
    res = autobatch.fit(model, data, loss_fn=mse, lr=0.01, epochs=2, initial_batch_size=8,
                        policy=Schedule([24, 40, 16, 56, 8]), decide_every=2, max_batch_size=64,
                        progress=False)
    sizes = {r.batch_size for r in res.history}
    assert {24, 40, 16, 56} <= sizes
    assert len(model.seen) == 400
    for epoch in (model.seen[:200], model.seen[200:]):
        assert sorted(epoch) == list(range(200))
    assert model.seen[:200] != model.seen[200:]  # reshuffled


def test_oom_halves_the_micro_batch_and_keeps_the_global_batch(regression, mse) -> None:
    x, y = regression(n=512, d=64)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1))

    model = make()
    budget = 500_000  # bytes: measured peaks are 415 kB at 64 examples, 628 kB at 128
    res = autobatch.fit(model, (x, y), loss_fn=mse, lr=0.01, max_steps=4, initial_batch_size=256,
                        policy="fixed", memory_budget=budget, probe_memory=False, progress=False)
    assert res.oom_retries >= 1
    assert res.max_micro_batch_size is not None and res.max_micro_batch_size < 128
    assert all(r.batch_size == 256 for r in res.history)
    assert all(r.accum_steps > 2 for r in res.history) and res.samples == 4 * 256
    # The same split from the start gives the same weights: failed attempts left no trace.
    again = make()
    ref = autobatch.fit(again, (x, y), loss_fn=mse, lr=0.01, max_steps=4,
                        initial_batch_size=256, policy="fixed",
                        max_micro_batch_size=res.max_micro_batch_size, progress=False)
    assert ref.oom_retries == 0
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_stop_at_target_callback_and_custom_eval(regression, mse) -> None:
    x, y = regression(n=1024, noise=0.1)
    stop = StopAtTarget("val_loss", 0.5, mode="min")
    seen = []

    class Spy(Callback):
        def on_eval(self, step, samples, metrics):
            seen.append((step, metrics["val_loss"]))

    res = autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=mse, val_data=(x[:200], y[:200]),
                        lr=0.05, epochs=50, eval_every=5, callbacks=[stop, Spy()], progress=False)
    assert res.stopped_by == "callback" and stop.reached_step == res.steps
    assert seen[-1][1] <= 0.5 and all(v > 0.5 for _, v in seen[:-1])


def test_classification_accuracy_and_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 10, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    res = autobatch.fit(model, (x, y), loss_fn=nn.functional.cross_entropy, val_data=(x, y),
                        lr=0.1, epochs=4, precision="bf16", initial_batch_size=16, progress=False)
    assert res.final_metrics["val_accuracy"] > 0.85
    assert all(math.isfinite(r.train_loss) for r in res.history)


def test_dataloader_workers_give_the_same_run(mse) -> None:
    data = IndexedData(n=96)
    runs = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = Recorder()
        autobatch.fit(model, torch.utils.data.DataLoader(data, batch_size=5), loss_fn=mse,
                      lr=0.01, epochs=1, initial_batch_size=16, num_workers=workers, progress=False)
        runs.append((model.seen, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def _log_worker_start(folder: str, worker_id: int) -> None:
    (Path(folder) / f"{os.getpid()}-{worker_id}").touch()


@pytest.mark.parametrize("persistent", [True, False])
def test_a_dataloaders_own_worker_settings_are_followed(persistent: bool, tmp_path, mse) -> None:
    # fit once collated in the main process whatever the DataLoader said; now its num_workers,
    # persistent_workers and worker_init_fn are followed, with the same run as no workers
    data = IndexedData(n=96)
    runs = []
    for workers, name in ((0, "none"), (2, "two")):
        folder = tmp_path / name
        folder.mkdir()
        loader = torch.utils.data.DataLoader(
            data, batch_size=5, num_workers=workers, persistent_workers=persistent and workers > 0,
            worker_init_fn=functools.partial(_log_worker_start, str(folder)) if workers else None)
        torch.manual_seed(0)
        model = Recorder()
        autobatch.fit(model, loader, loss_fn=mse, lr=0.01, epochs=2, initial_batch_size=16, progress=False)
        runs.append((model.seen, [p.detach().clone() for p in model.parameters()], len(list(folder.iterdir()))))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert runs[0][2] == 0 and runs[1][2] == (2 if persistent else 4)  # started once, or once per epoch
    # fit's own setting wins over the DataLoader's
    folder = tmp_path / "override"
    folder.mkdir()
    loader = torch.utils.data.DataLoader(data, batch_size=5, num_workers=2,
                                         worker_init_fn=functools.partial(_log_worker_start, str(folder)))
    autobatch.fit(Recorder(), loader, loss_fn=mse, lr=0.01, epochs=1, num_workers=0, progress=False)
    assert not list(folder.iterdir())


@pytest.mark.parametrize("method", ["micro", "per_example"])
def test_the_in_loop_estimate_matches_the_exact_noise_scale(method: str) -> None:
    # Parameters held still (lr 1e-12): the estimator's average over three epochs must land
    # on the population B_simple computed from brute-force per-example gradients.
    from autobatch.testing import exact_noise_scale, mlp

    prob = mlp()
    exact = exact_noise_scale(prob).noise_scale  # ~102, so B_simple <= 4B at B=64
    res = autobatch.fit(prob.model, (prob.x, prob.y), loss_fn=prob.loss_fn, lr=1e-12, epochs=3,
                        initial_batch_size=64, policy="fixed", gns_method=method,
                        gns_smoothing=0.99, progress=False)
    last = res.history[-1]
    # One micro-batch per step; the micro method splits the steps it measures in two.
    assert {r.accum_steps for r in res.history} == ({1} if method == "per_example" else {1, 2})
    assert last.noise_scale == pytest.approx(exact, rel=0.10)
    assert abs(last.noise_scale - exact) <= 3 * last.noise_scale_stderr


def test_estimator_off_runs_fixed_and_refuses_noise_driven_settings(regression, mse) -> None:
    x, y = regression(n=256)
    res = autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=mse, lr=0.01, max_steps=5, policy="fixed",
                        lr_scaling="none", gns_method="off", progress=False)
    assert all(math.isnan(r.noise_scale) for r in res.history) and res.steps == 5
    with pytest.raises(ValueError, match="gns_method='off' leaves policy='gns'"):
        autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=mse, lr=0.01, max_steps=5, policy="gns",
                      gns_method="off", progress=False)


def test_measure_mode_keeps_the_users_b_and_lr_and_records_the_noise_scale(regression, mse) -> None:
    # policy="measure": a fixed-B run, watched: B0 and the base LR (a user's schedule still
    # shapes it) at every step, the estimator running and recorded
    x, y = regression(n=1024, noise=3.0)
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** (k // 32))  # noqa: E731
    torch.manual_seed(0)
    res = autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=mse, lr=0.02, epochs=3, initial_batch_size=16,
                        policy="measure", lr_milestones=[1, 2], decide_every=5, lr_scheduler=sched, progress=False)
    assert {r.batch_size for r in res.history} == {16} and {r.examples for r in res.history} == {16}
    assert all(r.lr == r.base_lr == 0.02 * 0.5 ** ((r.samples - 16) // 16 // 32) for r in res.history)
    ready = [r.noise_scale for r in res.history if not math.isnan(r.noise_scale)]
    assert len(ready) > res.steps // 3 and all(n > 0 for n in ready)
    torch.manual_seed(0)
    fixed = autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=mse, lr=0.02, epochs=3, initial_batch_size=16,
                          policy="fixed", lr_scaling="none", lr_milestones=[100], lr_scheduler=sched, progress=False)
    # the same optimisation as a plain fixed-B run: only the measuring differs
    assert [r.train_loss for r in res.history] == pytest.approx([r.train_loss for r in fixed.history], rel=1e-5)


def test_torch_compile_gives_the_same_losses_and_norms_as_eager(regression, mse) -> None:
    # aot_eager runs dynamo + AOTAutograd (where parameter hooks could be lost) without a C
    # compiler, so the test stays seconds long.
    x, y = regression(n=256)
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        net = torch.compile(model, backend="aot_eager") if compiled else model
        res = autobatch.fit(net, (x, y), loss_fn=mse, lr=0.01, max_steps=6, initial_batch_size=32,
                            policy="fixed", lr_scaling="none", progress=False)
        runs.append(res.history)
    eager, comp = runs
    assert [r.train_loss for r in comp] == pytest.approx([r.train_loss for r in eager], rel=1e-5)
    assert comp[-1].grad_sq == pytest.approx(eager[-1].grad_sq, rel=1e-4)
    assert comp[-1].trace_cov == pytest.approx(eager[-1].trace_cov, rel=1e-4)


def test_per_example_on_a_compiled_model_whose_graph_predates_the_hooks(regression, mse) -> None:
    # A torch.compile wrapper trained before (here by a first fit with micro-batch norms) keeps
    # its graph, compiled without the per-example hooks: the fallback's warning once blamed a
    # parameter "used outside its layer"; it names the compiled graph and the fix.
    # (model.compile() in place runs the hooks of its submodules: no fallback there.)
    x, y = regression(n=256)
    torch.manual_seed(0)
    net = torch.compile(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)), backend="aot_eager")
    torch._dynamo.reset()
    try:
        kwargs = dict(loss_fn=mse, lr=0.01, max_steps=4, initial_batch_size=32, policy="fixed", progress=False)
        autobatch.fit(net, (x, y), gns_method="micro", **kwargs)
        with pytest.warns(UserWarning, match=r"torch.compile'd graph that skips the per-example hooks.*"
                                             r"torch._dynamo.reset\(\)") as caught:
            res = autobatch.fit(net, (x, y), gns_method="per_example", **kwargs)
        assert not any("used outside" in str(w.message) for w in caught)
        assert math.isfinite(res.history[-1].trace_cov)  # measured with micro-batch norms instead
        torch._dynamo.reset()  # the fix the warning gives: per-example norms are read
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = autobatch.fit(net, (x, y), gns_method="per_example", **kwargs)
        assert not any("per_example" in str(w.message) for w in caught)
        assert math.isfinite(res.history[-1].trace_cov)
    finally:
        torch._dynamo.reset()


def test_lr_factor_is_capped_at_max_lr_factor(regression, mse) -> None:
    x, y = regression(n=2048, noise=3.0)
    runs = {}
    for cap in (None, 1.5):
        torch.manual_seed(0)
        res = autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=mse, lr=0.01, epochs=2,
                            initial_batch_size=16, decide_every=5, lr_scaling="linear",
                            max_lr_factor=cap, progress=False)
        runs[cap] = max(r.lr for r in res.history)
    assert runs[None] > 0.015  # the linear rule alone goes past the cap here
    assert runs[1.5] == pytest.approx(0.015)


def test_a_budget_on_cpu_probes_the_micro_batch_first_and_nothing_runs_out(regression, mse) -> None:
    x, y = regression(n=512, d=64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1))
    res = autobatch.fit(model, (x, y), loss_fn=mse, lr=0.01, max_steps=3, initial_batch_size=256,
                        policy="fixed", memory_budget=500_000, memory_margin=0.0, progress=False)
    # measured peaks (test above): 415 kB at 64 examples, 628 kB at 128
    assert res.oom_retries == 0
    assert 64 <= res.max_micro_batch_size < 128
    assert all(r.micro_batch_size <= res.max_micro_batch_size for r in res.history)


@pytest.mark.parametrize("ranks", [
    pytest.param(1, id="one_process"),
    pytest.param(2, id="data_parallel", marks=pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch build without gloo")),
])
def test_each_step_runs_its_phases_in_the_documented_order(ranks, monkeypatch, tmp_path, regression, mse) -> None:
    # autobatch/train/loop.py's docstring numbers a step's phases; spies on what the loop calls
    # record them as they happen. data_parallel: a one-process gloo group that the loop takes
    # for a rank of two, so the step's gradient all-reduce runs (summing one process's tensors).
    events: list[str] = []

    def spy(owner, name: str, label: str) -> None:
        real = getattr(owner, name)

        def record(*args, **kwargs):
            events.append(label)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, record)

    spy(loop, "set_lr", "set LR")
    spy(FlatGradientBuffer, "all_reduce", "gradient sync")
    spy(StepNormMeter, "read", "read norms")
    spy(loop, "clip_gradients", "clip")
    spy(loop, "optimizer_step", "optimizer step")
    spy(BatchSizeController, "observe", "observe")
    spy(BatchSizeController, "maybe_decide", "decide")
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lr_at_forward: list[tuple[int, float]] = []  # (step, the optimizer's LR) at each forward

    def on_forward(module, args) -> None:
        events.append("forward")
        lr_at_forward.append((events.count("set LR"), opt.param_groups[0]["lr"]))

    model.register_forward_pre_hook(on_forward)
    model.weight.register_hook(lambda grad: events.append("backward"))
    x, y = regression(n=256)
    if ranks == 2:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        monkeypatch.setattr(loop, "setup_distributed", lambda device: DistInfo(rank=0, world_size=2))
    try:
        # warm-up: every step has an LR of its own, so the forward shows which step's LR it saw;
        # a decision every step (the loop asks for one on decision steps only)
        res = autobatch.fit(model, (x, y), loss_fn=mse, optimizer=opt, max_steps=3, initial_batch_size=16,
                            warmup_steps=4, max_grad_norm=1.0, decide_every=1, progress=False)
    finally:
        if ranks == 2:
            dist.destroy_process_group()
    # setup's check that the loss is mean-reduced: three forwards, no backward, before step 1
    assert events[:4] == ["forward"] * 3 + ["set LR"], events[:5]
    del events[:3], lr_at_forward[:3]
    steps: list[list[str]] = []
    for event in events:
        if event == "set LR":
            steps.append([])
        steps[-1].append(event)
    for step in steps:  # the micro-batches' forwards and backwards, in turn, as one phase
        first, end = step.index("forward"), len(step) - step[::-1].index("backward")
        assert step[first:end] == ["forward", "backward"] * ((end - first) // 2), step
        step[first:end] = ["forward", "backward"]
    sync = ["gradient sync"] if ranks == 2 else []  # one process: nothing to sync
    expected = ["set LR", "forward", "backward", *sync, "read norms", "clip", "optimizer step", "observe", "decide"]
    assert steps == [expected] * 3
    # every forward ran at its own step's LR (set before it), and the steps' LRs differ
    assert len({r.lr for r in res.history}) == 3 and {s for s, _ in lr_at_forward} == {1, 2, 3}
    assert all(lr == res.history[s - 1].lr for s, lr in lr_at_forward), lr_at_forward


def test_lr_is_base_times_rule_times_schedule_times_warmup(regression, mse) -> None:
    # 64 examples, B=16: 4 steps per epoch; linear rule (x1 at B0), step decay 0.5 after
    # epoch 1, 6 warm-up steps: hand-computed LRs of the 8 steps.
    x, y = regression(n=64)
    res = autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=mse, lr=0.1, epochs=2, initial_batch_size=16,
                        policy="fixed", lr_scaling="linear", lr_milestones=[1], lr_decay=0.5,
                        warmup_steps=6, progress=False)
    warmup = [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0, 1.0]
    decay = [1.0] * 4 + [0.5] * 4
    assert [r.lr for r in res.history] == pytest.approx([0.1 * w * d for w, d in zip(warmup, decay)])


def test_auto_measurement_interval_follows_its_calibration_and_survives_a_resume(tmp_path, regression, mse) -> None:
    from autobatch.train.checkpoint import load_checkpoint
    from autobatch.train.step_norms import MeasureSchedule

    x, y = regression(n=4096)
    args = dict(loss_fn=mse, lr=0.01, initial_batch_size=16, policy="fixed", gns_every="auto",
                checkpoint_dir=tmp_path, progress=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    first = autobatch.fit(model, (x, y), max_steps=100, **args)
    saved = load_checkpoint(tmp_path)["measure_schedule"]
    assert saved["split_cost"] is not None  # calibrated from this run's step times
    sched = MeasureSchedule("auto", base_batch=16)
    sched.load_state_dict(saved)
    every = sched.interval(16)
    assert every & (every - 1) == 0 and 1 <= every <= MeasureSchedule.MAX_EVERY  # a power of two
    # The first 20 steps are all measured (split in two), then the calibration's interval.
    split = [r.step for r in first.history if r.accum_steps == 2]
    assert split[:20] == list(range(1, 21))
    late = [s for s in split if s > 60]
    assert late and all((s - 1) % every == 0 for s in late)
    # A resumed run keeps the calibration: no new timing, the same interval.
    second = autobatch.fit(model, (x, y), max_steps=200, resume=True, **args)
    assert load_checkpoint(tmp_path)["measure_schedule"]["split_cost"] == saved["split_cost"]
    resumed = [r.step for r in second.history[100:] if r.accum_steps == 2]
    assert resumed == [s for s in range(101, 201) if (s - 1) % every == 0]


def test_step_records_built_without_validation_equal_validated_ones(regression, mse) -> None:
    # fit builds its per-step records with StepRecord.trusted (no validation); each must be
    # exactly what validating the same values gives, field types included.
    from autobatch.train.results import StepRecord

    x, y = regression(n=256)
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))  # noqa: E731
    res = autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=mse, lr=0.05, epochs=2, initial_batch_size=16,
                        lr_scheduler=sched, progress=False)
    for record in res.history:
        validated = StepRecord(**record.model_dump())
        assert record == validated and record.model_dump() == validated.model_dump()
        assert all(type(getattr(record, k)) is type(getattr(validated, k)) for k in StepRecord.model_fields)
    assert {type(r.lr) for r in res.history} == {float} and res.history[-1].noise_scale_stderr > 0
    assert StepRecord.trusted(**res.history[3].model_dump()) == res.history[3]


def test_an_oom_retry_leaves_no_trace_in_batchnorm_statistics(regression, mse) -> None:
    # The failed attempt's forwards updated the running statistics before running out of
    # memory; the retry must start from the buffers as they were before the step.
    x, y = regression(n=512, d=64)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 1))

    model = make()
    res = autobatch.fit(model, (x, y), loss_fn=mse, lr=0.01, max_steps=3, initial_batch_size=256,
                        policy="fixed", memory_budget=600_000, probe_memory=False, progress=False)
    assert res.oom_retries >= 1
    again = make()
    ref = autobatch.fit(again, (x, y), loss_fn=mse, lr=0.01, max_steps=3, initial_batch_size=256,
                        policy="fixed", max_micro_batch_size=res.max_micro_batch_size, progress=False)
    assert ref.oom_retries == 0 and [r.accum_steps for r in ref.history] == [r.accum_steps for r in res.history]
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name  # running_mean, running_var, num_batches_tracked too


class _OutOfMemoryAbove(nn.Module):
    """A classifier whose forward runs out of memory on more than ``limit`` examples, as a
    model that fits only the probed micro-batch on a full device would."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.lin, self.limit, self.sizes = nn.Linear(4, 3), limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated above {self.limit} examples)")
        return self.lin(x)


def test_evaluation_runs_in_micro_batches_under_the_training_cap() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(3, (64,), generator=g)
    xv, yv = torch.randn(100, 4, generator=g), torch.randint(3, (100,), generator=g)
    model = _OutOfMemoryAbove(limit=8)
    res = autobatch.fit(model, (x, y), loss_fn=nn.functional.cross_entropy, val_data=(xv, yv), lr=0.1, epochs=2,
                        initial_batch_size=16, max_micro_batch_size=8, policy="fixed", progress=False)
    assert max(model.sizes) == 8 and res.oom_retries == 0 and len(res.evals) == 2
    with torch.no_grad():
        logits = model.lin(xv)
    assert res.final_metrics["val_loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, yv)), rel=1e-6)
    assert res.final_metrics["val_accuracy"] == pytest.approx(float((logits.argmax(1) == yv).float().mean()))


def _soft_target_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """timm's SoftTargetCrossEntropy: targets are class distributions (Mixup, label smoothing)."""
    return torch.sum(-target * nn.functional.log_softmax(logits, dim=-1), dim=-1).mean()


def test_a_soft_target_loss_trains_and_val_loss_fn_scores_the_hard_labels() -> None:
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(256, 6, generator=g), torch.randn(50, 6, generator=g)
    labels, yv = x[:, :3].argmax(1), xv[:, :3].argmax(1)
    soft = 0.9 * nn.functional.one_hot(labels, 3).float() + 0.1 / 3  # label smoothing
    kwargs = {"loss_fn": _soft_target_ce, "lr": 0.1, "epochs": 2, "initial_batch_size": 16, "progress": False}
    steps = []

    class Count(autobatch.Callback):
        def on_step_end(self, record) -> None:
            steps.append(record.step)

    # without val_loss_fn the soft-target loss cannot read hard labels: refused before any step
    with pytest.raises(ValueError, match=r"val_data cannot be evaluated.*val_loss_fn"):
        autobatch.fit(nn.Linear(6, 3), (x, soft), val_data=(xv, yv), callbacks=[Count()], **kwargs)
    assert steps == []
    model = nn.Linear(6, 3)
    res = autobatch.fit(model, (x, soft), val_data=(xv, yv), val_loss_fn=nn.functional.cross_entropy, **kwargs)
    with torch.no_grad():
        logits = model(xv)
    assert res.final_metrics["val_loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, yv)), rel=1e-6)
    assert res.final_metrics["val_accuracy"] == pytest.approx(float((logits.argmax(1) == yv).float().mean()))
    # lr="auto" scores its trials on val_data with val_loss_fn too
    res = autobatch.fit(nn.Linear(6, 3), (x, soft), val_data=(xv, yv), val_loss_fn=nn.functional.cross_entropy,
                        **{**kwargs, "lr": "auto", "epochs": 8})
    assert res.lr_search is not None and math.isfinite(res.final_metrics["val_loss"])


class _GRULM(nn.Module):
    def __init__(self, vocab: int = 12, width: int = 16) -> None:
        super().__init__()
        self.emb, self.gru, self.head = nn.Embedding(vocab, width), nn.GRU(width, width, batch_first=True), \
            nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.emb(tokens))[0])


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A user's own LM loss on (x, x) batches: position t predicts token t + 1."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def test_a_gru_lm_on_x_x_batches_reports_next_token_accuracy_or_none() -> None:
    from autobatch.testing import markov_tokens

    tokens, _ = markov_tokens(320, vocab=12, length=10, seed=0)
    x, xv = tokens[:256], tokens[256:]
    kwargs = {"loss_fn": _next_token_loss, "val_data": (xv, xv), "lr": 0.5, "epochs": 3, "initial_batch_size": 16,
              "policy": "fixed", "progress": False}
    torch.manual_seed(0)
    model = _GRULM()
    res = autobatch.fit(model, (x, x), accuracy="next_token", **kwargs)
    with torch.no_grad():
        predicted = model(xv).argmax(-1)
    by_hand = float((predicted[:, :-1] == xv[:, 1:]).float().mean())
    assert by_hand > 0.2 and res.final_metrics["val_accuracy"] == pytest.approx(by_hand)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"accuracy='next_token'"):
        res = autobatch.fit(_GRULM(), (x, x), **kwargs)
    assert "val_accuracy" not in res.final_metrics and all("val_accuracy" not in e for e in res.evals)


def test_val_data_is_converted_once(monkeypatch) -> None:
    from autobatch import data as data_module

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 4, generator=g), torch.randn(256, 1, generator=g)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:64], y[:64]), batch_size=8)
    converted = []
    from_loader = data_module._from_loader
    monkeypatch.setattr(data_module, "_from_loader",
                        lambda loader, name: converted.append(loader is val) or from_loader(loader, name))
    autobatch.fit(nn.Linear(4, 1), (x, y), loss_fn=nn.functional.mse_loss, val_data=val, lr="auto", max_steps=100,
                  initial_batch_size=8, policy="fixed", progress=False)
    assert converted.count(True) == 1


def test_a_token_budget_stops_the_run_and_tokens_are_counted_by_hand() -> None:
    from autobatch.data import as_batch_source
    from autobatch.testing import USER_MODELS

    case = USER_MODELS["padded_lm"]()  # variable-length sequences, targets padded with -100
    source = as_batch_source(case.data)
    by_hand = sum(int((source.dataset[i][1] != -100).sum()) for i in range(len(source)))
    kwargs = dict(loss_fn=case.loss_fn, loss_items="tokens", lr=0.01, initial_batch_size=16, progress=False)
    whole = autobatch.fit(case.model, case.data, epochs=1, **kwargs)
    assert whole.history[-1].loss_items == by_hand  # every target of the epoch, once
    case = USER_MODELS["padded_lm"]()
    half = autobatch.fit(case.model, case.data, max_tokens=by_hand // 2, **kwargs)
    assert half.stopped_by == "max_tokens"
    assert half.history[-2].loss_items < by_hand // 2 <= half.history[-1].loss_items
    with pytest.raises(ValueError, match=r"max_tokens"):
        autobatch.fit(case.model, case.data, max_tokens=-1, **kwargs)


# -- gns_geometry="adam": the noise scale in Adam's geometry, the training untouched --------------

def _adam_run(noise_data, geometry: str, **kw):
    x, y = noise_data(256, 6, 3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    result = autobatch.fit(model, (x, y), loss_fn=nn.functional.mse_loss, optimizer=torch.optim.AdamW, lr=3e-3,
                           max_steps=30, initial_batch_size=16, gns_geometry=geometry,
                           progress=False, **kw)
    return model, result


def test_adam_geometry_measures_another_noise_scale_and_leaves_the_training_as_it_was(noise_data) -> None:
    # a fixed B: the measurement must not change a single step
    raw_model, raw = _adam_run(noise_data, "raw", policy="fixed")
    adam_model, adam = _adam_run(noise_data, "adam", policy="fixed")
    for a, b in zip(raw_model.parameters(), adam_model.parameters()):
        assert torch.equal(a, b)
    # clipping (tight here: every step clipped) keeps the raw norm, computed by torch instead of the meter
    clipped = [_adam_run(noise_data, g, policy="fixed", max_grad_norm=0.05)[0] for g in ("raw", "adam")]
    for a, b in zip(*(m.parameters() for m in clipped)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(clipped[0][0].weight, raw_model[0].weight, atol=1e-4)  # the clip was tight
    raw_b = [h.noise_scale for h in raw.history if math.isfinite(h.noise_scale)]
    adam_b = [h.noise_scale for h in adam.history if math.isfinite(h.noise_scale)]
    assert raw_b and adam_b and math.isnan(adam.history[0].noise_scale)
    assert abs(adam_b[-1] / raw_b[-1] - 1) > 0.1  # another quantity, read by the policies
    # the default policy follows it: the run trains, finite
    _, grown = _adam_run(noise_data, "adam")
    assert math.isfinite(grown.history[-1].train_loss)


def test_adam_geometry_is_refused_with_sgd_before_any_step(noise_data) -> None:
    x, y = noise_data(64, 6, 3)
    model = nn.Sequential(nn.Linear(6, 1))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"SGD's param groups \[0\] have no betas/eps; .*gns_geometry='raw'"):
        autobatch.fit(model, (x, y), loss_fn=nn.functional.mse_loss, lr=0.1, max_steps=3, gns_geometry="adam",
                      progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="gns_method='micro' \\(got 'per_example'\\)"):
        autobatch.fit(model, (x, y), loss_fn=nn.functional.mse_loss, optimizer=torch.optim.Adam, lr=0.1,
                      max_steps=3, gns_geometry="adam", gns_method="per_example", progress=False)
