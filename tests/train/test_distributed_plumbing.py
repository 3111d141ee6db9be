"""autobatch.train.distributed on one process: each rank's share of a step, the missing-backend
message, and the flat gradient buffer the step's all-reduce uses (a one-process gloo group)."""

from __future__ import annotations

import pytest
import torch.distributed as dist


def test_local_shares_cover_every_index_once() -> None:
    import torch

    from autobatch.train.distributed import DistInfo, local_share

    idx = torch.arange(11)
    shares = [local_share(idx, DistInfo(r, 4)) for r in range(4)]
    assert [len(s) for s in shares] == [3, 3, 3, 2]
    assert torch.equal(torch.cat(shares), idx)
    tail = [local_share(torch.arange(1), DistInfo(r, 2)) for r in range(2)]
    assert [len(s) for s in tail] == [1, 0]  # nothing dropped, a rank may get nothing


def test_a_missing_backend_names_the_fix(monkeypatch) -> None:
    import torch

    from autobatch.train.distributed import setup_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "is_gloo_available", lambda: False)
    with pytest.raises(RuntimeError, match="no 'gloo' process-group backend; install a torch build"):
        setup_distributed(torch.device("cpu"))


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch build without gloo")
def test_the_kept_flat_buffer_is_reused_and_reduces_like_a_new_one(tmp_path) -> None:
    import torch
    from torch import nn

    from autobatch.train.distributed import DistInfo, FlatGradientBuffer

    # A one-process group sums each tensor with itself alone: what is under test is the
    # gathering into the kept buffer and the scattering back, against a new buffer each time.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        info = DistInfo(rank=0, world_size=2)  # enabled, as on any data-parallel run
        model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
        params = list(model.parameters())
        kept, pointers = FlatGradientBuffer(), set()
        for step in range(3):
            for p in params:
                p.grad = torch.full_like(p, float(step + 1)) + torch.randn_like(p)
            expected = [p.grad.clone() for p in params]
            extra = torch.tensor([1.5, float(step)])
            reference = torch.cat([g.reshape(-1) for g in expected])
            totals, flat = kept.all_reduce(params, info, [extra[:1], extra[1]])  # 1-D and 0-d pieces
            pointers.add(flat.data_ptr())
            assert torch.equal(flat, reference) and torch.equal(totals, extra)
            assert all(torch.equal(p.grad, g) for p, g in zip(params, expected, strict=True))
        assert len(pointers) == 1  # one buffer for the three steps
        # The rank's own squared norm, read from the gathered buffer into a slot of extra
        # before the sum, against the norm of the gradients computed apart in float64.
        local = sum(float(p.grad.double().square().sum()) for p in params)
        totals, before = kept.all_reduce(params, info, [torch.tensor([1.5, -7.0, 3.0])], local_sq_norm=(1, 4.0))
        assert totals[0] == 1.5 and totals[2] == 3.0
        assert abs(float(totals[1]) - 4.0 * local) <= 1e-5 * local
        params[-1].grad = None  # a parameter no example reached: zeros, and the same size
        totals, flat = FlatGradientBuffer().all_reduce(params, info, [torch.tensor(2.0)])
        assert flat.numel() == sum(p.numel() for p in params) and torch.equal(params[-1].grad, torch.zeros(3))
        # Another size: a new buffer, not the one kept until now. `before` (a view of that one)
        # holds its memory, so the allocator cannot hand the same address out again.
        _, flat = kept.all_reduce(params[:2], info, [torch.tensor(2.0)])
        assert flat.data_ptr() != before.data_ptr() and flat.numel() == 5 * 7 + 7
    finally:
        dist.destroy_process_group()
