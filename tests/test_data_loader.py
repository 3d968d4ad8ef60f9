"""The prefetcher yields exactly what direct calls give, and hands errors on."""

import pytest
import torch
from hub_datasets import cifar_like, data_config

from distqat.config import DataConfig
from distqat.data import make_task
from distqat.data.loader import Prefetcher


def _direct(task, shard, offset, batch_size, count):
    return [task.batch(shard, offset + k * batch_size, batch_size) for k in range(count)]


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetcher_matches_direct_calls_and_resumes(tmp_path, depth):
    task = make_task(data_config("image", path=cifar_like(tmp_path / "c", n_train=40,
                                                           layout="disk")))
    want = _direct(task, 1, 6, 12, 8)  # crosses two epochs of 40 samples
    with Prefetcher(task, shard=1, offset=6, batch_size=12, depth=depth) as loader:
        got = [next(loader) for _ in range(5)]
        assert loader.position == 6 + 5 * 12
        resumed_at = loader.position
    with Prefetcher(task, shard=1, offset=resumed_at, batch_size=12, depth=depth) as loader:
        got += [next(loader) for _ in range(3)]
    for (wx, wy), (gx, gy) in zip(want, got, strict=True):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)


def test_prefetcher_on_teacher():
    task = make_task(DataConfig())
    with Prefetcher(task, 0, 64, 32) as loader:
        for k, (x, y) in zip(range(4), loader):
            ref = task.batch(0, 64 + 32 * k, 32)
            assert torch.equal(x, ref[0]) and torch.equal(y, ref[1])


class Failing:
    def batch(self, shard, offset, batch_size):
        if offset >= 20:
            raise OSError(f"disk gone at {offset}")
        return torch.full((batch_size,), float(offset)), torch.zeros(batch_size)


def test_prefetcher_raises_the_loading_error_in_order():
    loader = Prefetcher(Failing(), 0, 0, 10)
    assert float(next(loader)[0][0]) == 0 and float(next(loader)[0][0]) == 10
    with pytest.raises(OSError, match="disk gone at 20"):
        next(loader)
    assert loader.position == 20
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_close_stops_the_thread():
    loader = Prefetcher(Failing(), 0, 0, 1, depth=2)  # fills its queue, then waits
    loader.close()
    assert not loader._thread.is_alive()
