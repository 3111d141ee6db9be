import copy
import functools
import math
import random

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import Dataset

import autobatch
from autobatch.memory._count import LiveStorageBytes
from autobatch.memory.probe import MemoryProbeResult, largest_fitting, probe_memory

# ---------------------------------------------------------------------------- models


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 32, 3, stride=2, padding=1), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Flatten(), nn.Dropout(0.1), nn.Linear(32 * 20, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 64, context: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.block = nn.TransformerEncoderLayer(d, 4, 128, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.emb(x) + self.pos[: x.shape[1]]))


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 10)),
            lambda b: (torch.randn(b, 40), torch.randint(0, 10, (b,))),
            nn.functional.cross_entropy),
    "cnn_bn": (CNN,
               lambda b: (torch.randn(b, 1, 40), torch.randint(0, 10, (b,))),
               nn.functional.cross_entropy),
    "transformer": (TinyLM,
                    lambda b: (torch.randint(0, 50, (b, 32)), torch.randint(0, 50, (b, 32))),
                    lm_loss),
}
OPTIMIZERS = {
    "sgd_momentum": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    "adam": torch.optim.Adam,
}


def profiled_peak(model: nn.Module, batch: tuple, loss_fn, make_optimizer) -> int:
    """Peak bytes of the probed workload run for real, from the profiler's allocator events.

    An independent count: the CPU allocator's own allocation and free events (what the probe
    never looks at), plus the storages that were alive before profiling started.
    """
    model = copy.deepcopy(model).train()
    optimizer = make_optimizer(model.parameters())
    already_live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in (*model.parameters(), *model.buffers(), *batch)}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            loss = loss_fn(model(*batch[:-1]), batch[-1])
            loss.backward()
            del loss
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return sum(already_live.values()) + peak


# ---------------------------------------------------------------------------- the peak
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("case", CASES)
def test_estimated_peak_matches_the_profiler_within_2_percent(case: str, opt_name: str) -> None:
    make_model, make_batch, loss_fn = CASES[case]
    model, make_optimizer = make_model(), OPTIMIZERS[opt_name]
    for batch_size in (1, 24, 160):
        probe = probe_memory(model, make_batch(3), loss_fn, make_optimizer, budget_bytes=2**40,
                             max_micro_batch_size=batch_size, margin=0, mode="estimate")
        assert probe.max_micro_batch_size == batch_size and probe.capped
        reference = profiled_peak(model, make_batch(batch_size), loss_fn, make_optimizer)
        assert probe.peak_bytes_at_max == pytest.approx(reference, rel=0.02), batch_size
        assert probe.peak_bytes(batch_size) == probe.peak_bytes_at_max


@pytest.mark.parametrize("case", CASES)
def test_found_size_fits_and_the_next_multiple_of_8_does_not(case: str) -> None:
    make_model, make_batch, loss_fn = CASES[case]
    model = make_model()
    # A budget just above the real peak at 100, so the answer lands near 100.
    budget = profiled_peak(model, make_batch(100), loss_fn, torch.optim.Adam) + 1000
    probe = probe_memory(model, make_batch(4), loss_fn, torch.optim.Adam, budget_bytes=budget,
                         margin=0, mode="estimate")
    found = probe.max_micro_batch_size
    assert not probe.capped and 90 <= found <= 110
    above = (found // 8 + 1) * 8
    assert profiled_peak(model, make_batch(found), loss_fn, torch.optim.Adam) <= budget
    assert profiled_peak(model, make_batch(above), loss_fn, torch.optim.Adam) > budget
    assert probe.peak_bytes_at_max <= budget < probe.peak_bytes(found + 1)


def test_largest_fitting_on_piecewise_linear_peaks_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        kinks = sorted(rng.sample(range(2, 5000), rng.randint(0, 3)))
        slopes = [rng.randint(1, 5000) for _ in range(len(kinks) + 1)]

        def peak(b: int, kinks=kinks, slopes=slopes) -> int:
            total, start = 10_000, 1
            for kink, slope in zip([*kinks, math.inf], slopes):
                total += slope * (min(b, kink) - start)
                if b <= kink:
                    return total
                start = kink
            return total

        calls: list[int] = []
        counted = functools.lru_cache(maxsize=None)(lambda b, calls=calls: calls.append(b) or peak(b))
        upper, limit = 4096, rng.randint(10_000, peak(5000))
        truth = max(b for b in range(1, upper + 1) if peak(b) <= limit)
        assert largest_fitting(counted, limit, upper) == truth
        assert len(calls) <= 2 * math.log2(upper) + 2


# ---------------------------------------------------------------------------- real mode
def test_real_mode_confirms_the_estimate_in_two_steps_on_cpu() -> None:
    make_model, make_batch, loss_fn = CASES["cnn_bn"]
    model = make_model()
    estimate = probe_memory(model, make_batch(4), loss_fn, budget_bytes=3 * 2**20, margin=0.05,
                            mode="estimate")
    real = probe_memory(model, make_batch(4), loss_fn, budget_bytes=3 * 2**20, margin=0.05,
                        mode="real")
    assert real.mode == "real" and real.real_steps == 2
    assert real.max_micro_batch_size == estimate.max_micro_batch_size
    # On CPU both count the same storages: the real peak is the estimated one.
    assert real.measured == {real.max_micro_batch_size: estimate.peak_bytes_at_max}
    assert real.peak_bytes_at_max <= real.limit_bytes


class ScratchInRealRuns(nn.Module):
    """An MLP that, on real tensors only, keeps a scratch buffer as large as its input alive
    through the backward: memory the fake-tensor estimate cannot see (like a GPU workspace)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if not is_fake(x):
            scratch = torch.zeros(x.shape[0], 1024)
            out = out + 0 * scratch[:, :10]
        return out


@pytest.mark.slow
def test_real_mode_backs_off_after_an_oom_and_ends_inside_the_budget() -> None:
    model = ScratchInRealRuns()
    batch = (torch.randn(4, 40), torch.randint(0, 10, (4,)))
    budget = 4 * 2**20
    probe = probe_memory(model, batch, nn.functional.cross_entropy, torch.optim.Adam,
                         budget_bytes=budget, margin=0, mode="real")
    tried = sorted(probe.measured)
    assert probe.max_micro_batch_size == tried[0] and probe.measured[tried[0]] is not None
    assert all(probe.measured[b] is None for b in tried[1:]) and len(tried) >= 2
    assert probe.real_steps == 2 * len(tried)
    assert probe.peak_bytes_at_max <= budget
    # Independent check: the profiler's count of the found size fits, the first try did not.
    assert profiled_peak(model, (torch.randn(probe.max_micro_batch_size, 40),
                                 torch.randint(0, 10, (probe.max_micro_batch_size,))),
                         nn.functional.cross_entropy, torch.optim.Adam) <= budget
    first = max(tried)
    assert profiled_peak(model, (torch.randn(first, 40), torch.randint(0, 10, (first,))),
                         nn.functional.cross_entropy, torch.optim.Adam) > budget


# ---------------------------------------------------------------------------- state
@pytest.mark.parametrize("mode", ["estimate", "real"])
def test_the_probe_changes_no_state(mode: str) -> None:
    make_model, make_batch, loss_fn = CASES["cnn_bn"]
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn(model(make_batch(8)[0]), make_batch(8)[1]).backward()
    optimizer.step()  # Adam state and BatchNorm running stats exist and are not the initial
    loss_fn(model(make_batch(8)[0]), make_batch(8)[1]).backward()  # pending gradients
    model.eval()
    model.net[4].train()  # a mixed mode that must survive
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    opt_state = copy.deepcopy(optimizer.state_dict())
    modes = [m.training for m in model.modules()]
    example = make_batch(4)
    rng = torch.get_rng_state()

    probe = probe_memory(model, example, loss_fn, optimizer, budget_bytes=2**21, margin=0,
                         mode=mode)
    assert probe.real_steps == (2 if mode == "real" else 0)

    for name, value in model.state_dict().items():  # weights and BN running stats, counters
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert [m.training for m in model.modules()] == modes
    after = optimizer.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for key, state in opt_state["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(after["state"][key][name], value, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng)


# ---------------------------------------------------------------------------- datasets
class VariableLength(Dataset):
    """Token sequences of lengths 5..40; the collate pads to the longest in the batch."""

    def __init__(self) -> None:
        self.lengths = [5 + (7 * i) % 36 for i in range(50)]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int):
        n = self.lengths[i]
        return torch.randint(0, 50, (n,)), torch.randint(0, 50, (n,))


def test_a_dataset_example_is_probed_at_its_longest_item() -> None:
    data = VariableLength()
    longest = max(data.lengths)
    model = TinyLM(context=64)
    from_data = probe_memory(model, data, lm_loss, budget_bytes=2**40, max_micro_batch_size=64,
                             mode="estimate")
    batch = (torch.randint(0, 50, (1, longest)), torch.randint(0, 50, (1, longest)))
    from_batch = probe_memory(model, batch, lm_loss, budget_bytes=2**40, max_micro_batch_size=64,
                              mode="estimate")
    shorter = (batch[0][:, :20], batch[1][:, :20])
    from_short = probe_memory(model, shorter, lm_loss, budget_bytes=2**40, max_micro_batch_size=64,
                              mode="estimate")
    assert from_data.peak_bytes_at_max == from_batch.peak_bytes_at_max
    assert from_short.peak_bytes_at_max < from_batch.peak_bytes_at_max


def test_dict_batches_follow_the_loss_convention() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    probe = probe_memory(Net(), {"x": torch.randn(4, 8), "y": torch.randint(0, 2, (4,))},
                         lambda out, batch: nn.functional.cross_entropy(out, batch["y"]),
                         budget_bytes=2**40, max_micro_batch_size=32, mode="estimate")
    assert probe.max_micro_batch_size == 32


# ---------------------------------------------------------------------------- bad input
def mlp_and_batch():
    make_model, make_batch, loss_fn = CASES["mlp"]
    return make_model(), make_batch(4), loss_fn


def test_a_budget_below_one_step_says_how_many_bytes_are_needed() -> None:
    model, batch, loss_fn = mlp_and_batch()
    needed = probe_memory(model, batch, loss_fn, budget_bytes=2**40, max_micro_batch_size=1,
                          margin=0, mode="estimate").peak_bytes_at_max
    with pytest.raises(ValueError, match=rf"budget too small: a training step at batch size 1 "
                       rf"needs {needed:,} bytes .* raise budget_bytes to at least {needed:,}"):
        probe_memory(model, batch, loss_fn, budget_bytes=needed - 1, margin=0)


def test_a_model_failing_for_another_reason_is_reraised_not_reported_as_oom() -> None:
    model = nn.Sequential(nn.Linear(40, 128), nn.Linear(64, 10))  # mismatched shapes
    batch = (torch.randn(4, 40), torch.randint(0, 10, (4,)))
    for mode in ("estimate", "real"):
        with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied") as info:
            probe_memory(model, batch, nn.functional.cross_entropy, budget_bytes=2**30, mode=mode)
        assert not isinstance(info.value, torch.OutOfMemoryError)
        assert "not an out-of-memory error" in "".join(info.value.__notes__)


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (torch.tensor(3.0), r"example has no batch dimension: it holds a 0-d tensor"),
        ((torch.tensor(1.0), torch.tensor(2)), r"example has no batch dimension: it holds a 0-d"),
        ("not a batch", r"example has no batch dimension: it holds no tensor \(got a str\)"),
        ((torch.zeros(4, 40), torch.zeros(3)), r"their tensors differ in dimension 0|tensors differ"),
    ],
)
def test_an_example_without_a_batch_dimension_is_rejected(example, message: str) -> None:
    model, _, loss_fn = mlp_and_batch()
    with pytest.raises(ValueError, match=message):
        probe_memory(model, example, loss_fn, budget_bytes=2**30)


def test_invalid_arguments_are_all_reported_at_once() -> None:
    model, batch, loss_fn = mlp_and_batch()
    with pytest.raises(ValueError, match=r"max_micro_batch_size must be an integer >= 1 "
                       r"\(got max_micro_batch_size=0\)"):
        probe_memory(model, batch, loss_fn, budget_bytes=2**30, max_micro_batch_size=0)
    with pytest.raises(ValueError, match=r"budget_bytes must be > 0 bytes \(got budget_bytes=-1\)"
                       r".*margin must be in \[0, 1\) \(got margin=1.5\).*mode must be one of "
                       r"'auto', 'estimate', 'real' \(got mode='fast'\)"):
        probe_memory(model, batch, loss_fn, budget_bytes=-1, margin=1.5, mode="fast")


def test_a_non_scalar_loss_and_a_missing_device_are_rejected() -> None:
    model, batch, _ = mlp_and_batch()
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor \(got a tensor of shape \(1,\)\)"):
        probe_memory(model, batch, lambda out, y: nn.functional.cross_entropy(
            out, y, reduction="none"), budget_bytes=2**30)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' is not available on this machine"):
            probe_memory(model, batch, nn.functional.cross_entropy, device="cuda",
                         budget_bytes=2**30)


# ---------------------------------------------------------------------------- the result
def test_result_table_plot_and_interpolation(tmp_path) -> None:
    model, batch, loss_fn = mlp_and_batch()
    probe = probe_memory(model, batch, loss_fn, budget_bytes=2**21, margin=0.1)
    assert isinstance(probe, MemoryProbeResult) and probe.mode == "estimate" and probe.device == "cpu"
    assert probe.limit_bytes == math.floor(2**21 * 0.9)
    sizes = sorted(probe.estimated)
    a, b = sizes[1], sizes[2]
    mid = (a + b) // 2
    expected = probe.estimated[a] + (probe.estimated[b] - probe.estimated[a]) * (mid - a) / (b - a)
    assert probe.peak_bytes(mid) == round(expected)
    text = str(probe)
    assert f"max micro-batch   {probe.max_micro_batch_size:12d}" in text
    assert "memory probe on cpu (estimate mode)" in text
    png = probe.plot(tmp_path / "probe.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert autobatch.probe_memory is probe_memory and autobatch.MemoryProbeResult is MemoryProbeResult


def test_a_model_fake_tensors_cannot_run_gets_a_clear_error() -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x[x.sum(1) > -1e9])  # every row, but a value-dependent shape

    batch = (torch.randn(4, 8), torch.randint(0, 2, (4,)))
    with pytest.raises(RuntimeError, match=r"fake tensors cannot run this model's training step,"
                       r" although it runs on real tensors"):
        probe_memory(Masked(), batch, nn.functional.cross_entropy, budget_bytes=2**30)


# ---------------------------------------------------------------------------- issue 10
def test_batchnorm_models_are_probed_from_the_smallest_batch_they_train_on() -> None:
    from autobatch.testing import SmallResNet

    mlp_bn = nn.Sequential(nn.Linear(40, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    for model, batch in ((mlp_bn, (torch.randn(4, 40), torch.randint(0, 10, (4,)))),
                         (SmallResNet(), (torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))))):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            model.train()(batch[0][:1])  # why batch size 1 cannot be probed
        probe = probe_memory(model, batch, nn.functional.cross_entropy, torch.optim.Adam,
                             budget_bytes=2**24, margin=0, mode="real")
        assert probe.min_micro_batch_size == 2 and 1 not in probe.estimated
        assert probe.measured[probe.max_micro_batch_size] <= probe.limit_bytes
    # The estimate at 2 against the profiler (the ResNet's CPU Conv2d kernels allocate
    # scratch the count cannot see, so only the MLP is compared).
    two = (torch.randn(2, 40), torch.randint(0, 10, (2,)))
    profiled = profiled_peak(mlp_bn, two, nn.functional.cross_entropy, torch.optim.Adam)
    probe = probe_memory(mlp_bn, two, nn.functional.cross_entropy, torch.optim.Adam,
                         budget_bytes=2**40, max_micro_batch_size=2, margin=0)
    assert probe.peak_bytes_at_max == pytest.approx(profiled, rel=0.02)


def test_optimizer_specs_probe_alike_and_an_adamw_instance_is_left_untouched() -> None:
    model, batch, loss_fn = mlp_and_batch()
    groups = [{"params": model[0].parameters(), "weight_decay": 0.1},
              {"params": model[2].parameters(), "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=1e-3)
    loss_fn(model(batch[0]), batch[1]).backward()
    adamw.step()
    state = copy.deepcopy(adamw.state_dict())
    weights = copy.deepcopy(model.state_dict())
    budget = 2**21
    by_class = probe_memory(model, batch, loss_fn, torch.optim.AdamW, budget_bytes=budget)
    by_instance = probe_memory(model, batch, loss_fn, adamw, budget_bytes=budget, mode="real")
    assert by_instance.max_micro_batch_size == by_class.max_micro_batch_size
    assert by_instance.estimated.items() <= {**by_class.estimated, **by_instance.estimated}.items()
    assert all(by_instance.estimated[b] == by_class.estimated[b]
               for b in set(by_class.estimated) & set(by_instance.estimated))
    assert torch.equal(adamw.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert adamw.state_dict()["param_groups"] == state["param_groups"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    momentum = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    by_partial = probe_memory(model, batch, loss_fn, momentum, budget_bytes=budget)
    by_sgd = probe_memory(model, batch, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                          budget_bytes=budget)
    assert by_partial.estimated == by_sgd.estimated
    assert by_partial.max_micro_batch_size > by_class.max_micro_batch_size  # one state tensor instead of two


@pytest.mark.parametrize("case", CASES)
def test_a_mixed_precision_step_is_probed_under_autocast(case: str) -> None:
    # Found on an H200: fit(precision="bf16") probed an fp32 step. The reference is the same
    # live-storage count on a real bf16 autocast run (real tensors, no fake mode); the CPU
    # profiler would also see scratch that bf16 kernels allocate and free inside one op.
    make_model, make_batch, loss_fn = CASES[case]
    model, make_optimizer = make_model(), OPTIMIZERS["adam"]
    for batch_size in (1, 160):
        estimate = {precision: probe_memory(
            model, make_batch(3), loss_fn, make_optimizer, budget_bytes=2**40, margin=0,
            max_micro_batch_size=batch_size, mode="estimate", precision=precision).peak_bytes_at_max
            for precision in ("fp32", "bf16")}
        replica, batch = copy.deepcopy(model).train(), make_batch(batch_size)
        optimizer = make_optimizer(replica.parameters())
        counter = LiveStorageBytes("cpu")
        with counter:
            counter.track(replica, batch)
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_fn(replica(*batch[:-1]), batch[-1])
                loss.backward()
                del loss
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert estimate["bf16"] == pytest.approx(counter.peak_bytes, rel=1e-3), batch_size
    assert estimate["bf16"] < 0.9 * estimate["fp32"]  # at 160 the bf16 activations dominate
    with pytest.raises(ValueError, match=r"precision must be one of 'fp32', 'bf16', 'fp16' \(got precision='half'\)"):
        probe_memory(model, make_batch(3), loss_fn, make_optimizer, budget_bytes=2**30, precision="half")


@pytest.mark.parametrize("width,budget", [(4, 20_000), (32, 20_000), (32, 60_000), (128, 200_000)])
@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_fit_runs_the_micro_batch_the_probe_found(width: int, budget: int, optimizer) -> None:
    # Under a small CPU budget fit once raised "a single example ran out of memory" where the
    # probe had said tens of examples fit (CLI: autobatch fit --problem synthetic --budget 20000).
    torch.manual_seed(0)
    data = (torch.randn(4096, 16), torch.randint(0, 4, (4096,)))
    model = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 4))
    found = probe_memory(model, data, nn.functional.cross_entropy, optimizer=optimizer,
                         budget_bytes=budget).max_micro_batch_size
    result = autobatch.fit(model, data, loss_fn=nn.functional.cross_entropy, optimizer=optimizer, lr=0.01,
                           memory_budget=budget, initial_batch_size=2 * found, max_steps=3, decide_every=100,
                           progress=False)
    assert result.oom_retries == 0  # every micro-batch at the probed size ran inside the budget
    assert result.max_micro_batch_size == found


def test_the_probe_never_collates_one_example() -> None:
    # a collate that needs an even batch (timm's Mixup) once failed on the probe's template
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data._utils.collate import default_collate

    def even_only(items):
        if len(items) % 2:
            raise ValueError(f"batch size should be even (got {len(items)})")
        return default_collate(items)

    data = TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    model = nn.Linear(16, 4)
    by_loader = probe_memory(model, DataLoader(data, batch_size=8, collate_fn=even_only), nn.functional.cross_entropy,
                             budget_bytes=50_000)
    by_tensors = probe_memory(model, data.tensors, nn.functional.cross_entropy, budget_bytes=50_000)
    assert by_loader.max_micro_batch_size == by_tensors.max_micro_batch_size
