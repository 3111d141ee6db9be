"""autobatch.devices: the device a user names, as the tensors on it report it."""

import pytest
import torch

from autobatch.devices import canonical_device


def test_canonical_device_gives_the_index_tensors_report(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found on an H200: fit(device="cuda") with the model on cuda:0 failed the probe's
    # same-device check, because torch.device("cuda") != torch.device("cuda:0").
    assert torch.device("cuda") != torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert canonical_device("cuda") == torch.device("cuda", 1)
    assert canonical_device(torch.device("cuda")) == torch.device("cuda:1")
    assert canonical_device("cuda:0") == torch.device("cuda", 0)  # an explicit index stays
    assert canonical_device("cpu") == torch.device("cpu") == torch.zeros(1).device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert canonical_device("cuda") == torch.device("cuda")  # left for the caller to report
