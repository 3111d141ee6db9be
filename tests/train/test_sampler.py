import pytest
import torch

from autobatch.train.sampler import SampleStream, split_sizes


def test_every_example_once_per_epoch_whatever_the_batch_sizes() -> None:
    stream = SampleStream(103, seed=7)
    sizes = [8, 8, 16, 5, 64, 32]
    epoch0 = []
    i = 0
    while stream.epoch == 0:
        epoch0.append(stream.take(sizes[i % len(sizes)]))
        i += 1
    order = torch.cat(epoch0)
    assert sorted(order.tolist()) == list(range(103))
    # the order depends on (seed, epoch) only, not on how it was cut into batches
    assert torch.equal(order, torch.cat([SampleStream(103, seed=7).take(103)]))
    nxt = stream.take(103)
    assert sorted(nxt.tolist()) == list(range(103)) and not torch.equal(nxt, order)


def test_a_step_never_spans_two_epochs() -> None:
    stream = SampleStream(10, shuffle=False)
    assert stream.take(8).tolist() == list(range(8))
    assert stream.take(8).tolist() == [8, 9]
    assert stream.epoch == 1 and stream.position == 0
    assert stream.epochs_done == 1.0


def test_state_dict_resumes_the_same_sequence() -> None:
    a = SampleStream(50, seed=3)
    for n in (7, 9, 30, 11):
        a.take(n)
    b = SampleStream(50, seed=0)
    b.load_state_dict(a.state_dict())
    for n in (13, 40, 6):
        assert torch.equal(a.take(n), b.take(n))
    with pytest.raises(ValueError, match="50 examples, this one has 49"):
        SampleStream(49).load_state_dict(a.state_dict())


@pytest.mark.parametrize(("epoch", "position"), [(0, 50), (0, -1), (-1, 0)])
def test_a_state_outside_the_data_is_refused_and_changes_nothing(epoch, position) -> None:
    stream = SampleStream(50, seed=3)
    stream.take(7)
    with pytest.raises(ValueError, match=rf"a sample stream state at epoch {epoch}, position {position} is outside "
                       r"the data: the position must be in \[0, 50\) and the epoch >= 0"):
        stream.load_state_dict({**stream.state_dict(), "seed": 4, "epoch": epoch, "position": position})
    assert (stream.seed, stream.epoch, stream.position) == (3, 0, 7)


def test_split_sizes() -> None:
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert split_sizes(3, 5) == [1, 1, 1]
    with pytest.raises(ValueError, match="parts=0"):
        split_sizes(3, 0)
