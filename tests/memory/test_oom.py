import pytest
import torch
from torch import nn

from autobatch.memory.oom import MemoryBudget, is_oom_error, release_after_oom


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total)"),
        RuntimeError("HIP out of memory. Tried to allocate 1.50 GiB"),
        RuntimeError("XPU out of memory. Tried to allocate 512.00 MiB"),
        RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                     "allocate memory: you tried to allocate 4611686018427387904 bytes."),
        RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you "
                     "passed in a non-contiguous input."),
        MemoryError(),
    ],
)
def test_every_oom_form_is_recognised(exc: BaseException) -> None:
    assert is_oom_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x2)"),
        ValueError("out of memory"),  # not a RuntimeError: not torch's
        TypeError("forward() missing 1 required positional argument"),
        KeyboardInterrupt(),
    ],
)
def test_other_errors_are_not_oom(exc: BaseException) -> None:
    assert not is_oom_error(exc)


def test_the_real_cpu_allocator_failure_is_recognised() -> None:
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**60, dtype=torch.uint8)
    assert is_oom_error(info.value)


def test_budget_counts_storage_bytes_as_a_hand_count_says() -> None:
    with MemoryBudget(10_000) as guard:
        a = torch.zeros(100)  # 400 bytes
        b = torch.ones(50, dtype=torch.float64)  # 400 bytes
        view = a[10:20]  # a view: no new storage
        a.add_(1)  # in place: no new storage
        assert guard.current_bytes == 800
        c = a * 2  # 400 more
        del c
        assert guard.current_bytes == 800
        del a, view
        assert guard.current_bytes == 400
    assert guard.peak_bytes == 1200
    del b


def test_views_of_storage_alive_before_the_block_are_not_counted() -> None:
    # fit's step splits a slice of the epoch's permutation: 8 bytes per example of the data set,
    # alive before the step and not part of it (it once counted, whole, against the budget)
    order = torch.randperm(4096)  # 32,768 bytes
    step = order[:64]
    with MemoryBudget(1_000) as guard:
        chunks = torch.split(step, [32, 32])  # views: nothing allocated
        flat = step.view(8, 8)
        assert guard.current_bytes == 0
        copied = chunks[0] + 0  # a new storage: 32 int64 = 256 bytes
        assert guard.current_bytes == 256
        del copied
    assert guard.peak_bytes == 256
    del chunks, flat


def test_budget_raises_torch_oom_once_the_live_total_passes_it() -> None:
    keep = []
    with pytest.raises(torch.OutOfMemoryError, match=r"out of memory under MemoryBudget: "
                       r"1,200 bytes live, budget 1,000 bytes"):
        with MemoryBudget(1_000):
            for _ in range(5):
                keep.append(torch.zeros(100))  # 400 bytes each: the third passes 1,000
    assert len(keep) == 2


def test_budget_baseline_counts_what_was_already_live() -> None:
    model = nn.Linear(10, 10)  # 110 floats = 440 bytes
    batch = torch.zeros(4, 10)  # 160 bytes
    with MemoryBudget(10_000, baseline=(model, batch)) as guard:
        assert guard.current_bytes == 600
        model(batch).sum().backward()
    assert model.weight.grad is not None
    with pytest.raises(torch.OutOfMemoryError, match="600 bytes live, budget 599 bytes"):
        with MemoryBudget(599, baseline=(model.weight, model.bias, batch)):
            pass  # gradients not passed: only the 600 bytes of tensors count


def test_budget_rejects_a_non_positive_budget() -> None:
    with pytest.raises(ValueError, match=r"budget_bytes must be > 0 \(got budget_bytes=0\)"):
        MemoryBudget(0)


def test_oom_in_backward_is_caught_and_release_frees_everything() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = torch.randn(32, 64)
    model(batch).sum().backward()
    optimizer.step()  # momentum buffers exist now
    state_before = [s["momentum_buffer"].clone() for s in optimizer.state.values()]
    weights_before = [p.detach().clone() for p in model.parameters()]

    model.zero_grad(set_to_none=True)
    guard = MemoryBudget(10**9, baseline=(model, optimizer, batch))
    with guard:
        model(batch).sum().backward()
    model.zero_grad(set_to_none=True)
    budget = guard.peak_bytes - 1  # one byte short of what the step needs
    oom = False
    try:
        with MemoryBudget(budget, baseline=(model, optimizer, batch)):
            model(batch).sum().backward()
    except Exception as exc:
        oom = is_oom_error(exc)
    assert oom
    release_after_oom(model, optimizer)
    assert all(p.grad is None for p in model.parameters())
    for s, before in zip(optimizer.state.values(), state_before):
        torch.testing.assert_close(s["momentum_buffer"], before, rtol=0, atol=0)
    for p, before in zip(model.parameters(), weights_before):
        torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)
    # Nothing of the failed step is left alive: a new guard sees only the baseline.
    with MemoryBudget(10**9, baseline=(model, optimizer, batch)) as after:
        pass
    expected = sum(t.nbytes for t in (*model.parameters(), batch)) + sum(
        s["momentum_buffer"].nbytes for s in optimizer.state.values())
    assert after.current_bytes == expected
