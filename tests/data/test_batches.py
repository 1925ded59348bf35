"""DeviceBatches: permutations, determinism in (seed, epoch), resume, drop_last."""

from __future__ import annotations

import itertools

import pytest
import torch

from kfcrun.data import DeviceBatches
from kfcrun.errors import CheckpointError, ConfigError

N = 10


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i, so a batch's images reveal their indices."""
    images = torch.arange(N, dtype=torch.uint8).view(N, 1, 1, 1).expand(N, 3, 2, 2).contiguous()
    return images, torch.arange(N, dtype=torch.int64)


def flat(batches: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(batches))


def take(batches: DeviceBatches, k: int) -> list[list[int]]:
    out = []
    for _ in range(k):
        images, labels = next(batches)
        assert images.dtype == torch.uint8 and torch.equal(images[:, 0, 0, 0].long(), labels)
        out.append(labels.tolist())
    return out


def test_each_epoch_is_a_permutation(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    batches = DeviceBatches(*data, 5, seed=0)
    assert batches.batches_per_epoch == 2
    epochs = [flat(take(batches, 2)) for _ in range(4)]
    for order in epochs:
        assert sorted(order) == list(range(N))
    assert len({tuple(o) for o in epochs}) > 1, "epochs should be shuffled differently"
    assert batches.epoch == 4 and batches.position == 0


def test_order_is_a_function_of_seed_and_epoch(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b, c = (DeviceBatches(*data, 2, seed=s) for s in (7, 7, 8))
    assert take(a, 15) == take(b, 15)
    assert take(DeviceBatches(*data, 2, seed=7), 15) != take(c, 15)
    # the documented formula, reproduced by hand
    g = torch.Generator().manual_seed(DeviceBatches.epoch_seed(7, 1))
    assert flat(take(DeviceBatches(*data, 2, seed=7), 10)[5:]) == torch.randperm(N, generator=g).tolist()


def test_resume_reproduces_the_next_batches(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    original = DeviceBatches(*data, 3, seed=1)
    take(original, 4)  # into the second epoch: 3 batches per epoch
    state = original.state_dict()
    assert state == {"epoch": 1, "position": 1}
    expected = take(original, 7)
    resumed = DeviceBatches(*data, 3, seed=1)
    resumed.load_state_dict(state)
    assert take(resumed, 7) == expected


def test_drop_last(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    dropped = DeviceBatches(*data, 4, seed=0)
    assert dropped.batches_per_epoch == 2
    assert [len(b) for b in take(dropped, 4)] == [4, 4, 4, 4]
    kept = DeviceBatches(*data, 4, seed=0, drop_last=False)
    assert kept.batches_per_epoch == 3
    first_epoch = take(kept, 3)
    assert [len(b) for b in first_epoch] == [4, 4, 2] and sorted(flat(first_epoch)) == list(range(N))
    # with or without drop_last, the same permutation is used
    assert take(DeviceBatches(*data, 4, seed=0), 2) == first_epoch[:2]


def test_bad_sizes_and_states(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    with pytest.raises(ConfigError, match="batch size 11"):
        DeviceBatches(*data, 11, seed=0)
    assert DeviceBatches(*data, 11, seed=0, drop_last=False).batches_per_epoch == 1
    with pytest.raises(CheckpointError, match="position=5"):
        DeviceBatches(*data, 5, seed=0).load_state_dict({"epoch": 0, "position": 5})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_order_on_gpu(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    cpu = DeviceBatches(*data, 3, seed=5)
    gpu = DeviceBatches(*(t.cuda() for t in data), 3, seed=5)
    for _ in range(7):
        (xc, yc), (xg, yg) = next(cpu), next(gpu)
        assert xg.device.type == "cuda" and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
