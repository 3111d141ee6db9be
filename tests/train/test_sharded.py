"""autobatch/train/sharded.py on one process: the layout of a model sharded with fully_shard on a
one-process gloo group, and the setups it refuses (the multi-process behaviour is in
tests/distributed/test_fsdp.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from autobatch.testing import BlockTransformer
from autobatch.train.distributed import DistInfo
from autobatch.train.sharded import sharded_layout

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")


@pytest.fixture
def group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded(mesh_per_module: bool = False) -> BlockTransformer:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = BlockTransformer(depth=2)
    mesh = init_device_mesh("cpu", (1,))
    for block in model.blocks:
        fully_shard(block, mesh=init_device_mesh("cpu", (1,), mesh_dim_names=("other",)) if mesh_per_module else mesh)
    fully_shard(model, mesh=mesh)
    return model


def test_a_plain_model_has_no_layout_and_a_sharded_one_is_described(group) -> None:
    assert sharded_layout(BlockTransformer(), DistInfo(), torch.device("cpu")) is None
    layout = sharded_layout(_sharded(), DistInfo(), torch.device("cpu"), "step")
    assert (layout.data_parallel, layout.replicate, layout.reduce, len(layout.units)) == (1, 1, "step", 3)


def test_meshes_that_cannot_work_are_refused_with_the_fix(group) -> None:
    with pytest.raises(ValueError, match=r"sharded on a mesh of 1 processes but the process group has 2; .*"
                                         r"build the mesh over every process"):
        sharded_layout(_sharded(), DistInfo(rank=0, world_size=2), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"parameters live on 2 device meshes; .* same mesh"):
        sharded_layout(_sharded(mesh_per_module=True), DistInfo(), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"fsdp_reduce must be one of \('micro_batch', 'step'\) \(got fsdp_reduce='epoch'\)"):
        sharded_layout(_sharded(), DistInfo(), torch.device("cpu"), "epoch")  # type: ignore[arg-type]
