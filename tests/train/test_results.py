"""What fit returns, presented: the history as a DataFrame, the summary and the plot."""

from __future__ import annotations

import sys

import pytest
from torch import nn

import autobatch
from autobatch.train.results import StepRecord


@pytest.fixture
def result(regression, mse):
    x, y = regression(n=1024, noise=3.0)
    return autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=mse, val_data=(x[:128], y[:128]), lr=0.02, epochs=3,
                         initial_batch_size=16, decide_every=5, policy="gns", progress=False)


def test_the_history_as_a_dataframe_is_the_records_by_hand(result, monkeypatch) -> None:
    pd = pytest.importorskip("pandas")
    frame = result.to_pandas()
    by_hand = pd.DataFrame([rec.model_dump() for rec in result.history])
    pd.testing.assert_frame_equal(frame, by_hand)
    assert list(frame.columns) == list(StepRecord.model_fields) and len(frame) == result.steps
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(ImportError, match=r'FitResult.to_pandas needs pandas: pip install "torch-autobatch\[pandas\]"'):
        result.to_pandas()
