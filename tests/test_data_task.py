"""The task contract: objectives against torch references, chunked eval, the registry."""

import math

import pytest
import torch
import torch.nn.functional as F
from hub_datasets import data_config

from distqat.config import DataConfig
from distqat.data import (CausalLM, Classification, check_data, check_task, make_objective,
                          make_task)


def test_classification_objective_matches_torch():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(12, 5, generator=gen), torch.randint(0, 5, (12,), generator=gen)
    obj = Classification()
    assert torch.allclose(obj.loss(logits, labels), F.cross_entropy(logits, labels))
    assert obj.units(labels) == 12
    sums = obj.eval_sums(logits, labels)
    metrics = obj.eval_metrics(sums, obj.units(labels))
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))


def test_causal_lm_objective_shifts_tokens():
    gen = torch.Generator().manual_seed(1)
    logits, ids = torch.randn(3, 7, 11, generator=gen), torch.randint(0, 11, (3, 7), generator=gen)
    obj = CausalLM()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    manual = -torch.stack([torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]]
                           for b in range(3) for t in range(6)]).mean()
    assert torch.allclose(obj.loss(logits, ids), ref)
    assert torch.allclose(ref, manual, atol=1e-6)
    assert obj.units(ids) == 3 * 6
    metrics = obj.eval_metrics(obj.eval_sums(logits, ids), obj.units(ids))
    assert metrics["loss"] == pytest.approx(float(ref), rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(float(ref)), rel=1e-6)
    with pytest.raises(ValueError, match="causal LM"):
        obj.loss(logits[:, :, 0], ids)


@pytest.mark.parametrize("obj,shape,classes", [(Classification(), (10,), 4),
                                               (CausalLM(), (10, 6), 9)])
def test_eval_in_chunks_equals_all_at_once(obj, shape, classes):
    gen = torch.Generator().manual_seed(2)
    out = torch.randn(*shape, classes, generator=gen)
    target = torch.randint(0, classes, shape, generator=gen)
    whole = obj.eval_metrics(obj.eval_sums(out, target), obj.units(target))
    sums, units = {}, 0
    for lo, hi in ((0, 3), (3, 4), (4, 10)):
        for k, v in obj.eval_sums(out[lo:hi], target[lo:hi]).items():
            sums[k] = sums.get(k, 0.0) + v
        units += obj.units(target[lo:hi])
    chunked = obj.eval_metrics(sums, units)
    assert chunked.keys() == whole.keys()
    for k in whole:
        assert chunked[k] == pytest.approx(whole[k], rel=1e-6)


def test_prepare_input_keeps_token_ids():
    obj = CausalLM()
    ids = torch.tensor([[1, 2]])
    assert obj.prepare_input(ids, torch.float64).dtype == torch.int64
    assert obj.prepare_input(torch.zeros(2), torch.float64).dtype == torch.float64


def test_registry_errors_name_the_field_without_loading():
    with pytest.raises(ValueError, match=r"^data\.name: unknown task 'nope'"):
        check_task(_named("nope"))
    with pytest.raises(ValueError, match=r"^data\.args\.sequence_len: unknown setting"):
        check_task(data_config("text", args={"sequence_len": 4}))
    with pytest.raises(ValueError, match=r"^data\.args\.seq_len: expected an integer >= 2"):
        check_task(data_config("text", args={"seq_len": 1}))
    with pytest.raises(ValueError, match=r"^data\.args\.foo: task 'teacher' takes no"):
        check_task(data_config("teacher", args={"foo": 1}))
    # the path is not read by check_task (it does not exist)
    check_task(data_config("image", path="/nonexistent/cifar"))
    assert isinstance(make_objective(data_config("text", path="/nonexistent")), CausalLM)
    assert isinstance(make_objective(data_config("audio")), Classification)


def _named(name):
    cfg = data_config("teacher")
    object.__setattr__(cfg, "name", name)
    return cfg


def test_check_data_missing_path_is_a_value_error():
    with pytest.raises(ValueError, match="/nonexistent/cifar"):
        check_data(data_config("image", path="/nonexistent/cifar", dataset="uoft-cs/cifar10"))
    with pytest.raises(ValueError, match="data.path"):
        check_data(data_config("digits", path="/nonexistent/digits.csv"))
    check_data(data_config("teacher"))


@pytest.mark.parametrize("name", ["teacher", "digits"])
def test_builtin_tasks_take_offsets(name):
    task = make_task(DataConfig(name=name))
    a = task.batch(1, 96, 32)
    b = task.batch(1, 96, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], task.batch(2, 96, 32)[0])
    assert not torch.equal(a[0], task.batch(1, 64, 32)[0])
    assert isinstance(task.objective, Classification)


def test_digits_offsets_index_samples():
    task = make_task(DataConfig(name="digits"))
    whole = task.batch(0, 0, 40)
    part = task.batch(0, 10, 20)
    assert torch.equal(whole[0][10:30], part[0])
    n = len(task.train_y)  # an epoch boundary inside one batch
    across = task.batch(0, n - 5, 10)
    assert torch.equal(across[0][:5], task.batch(0, n - 5, 5)[0])
    assert torch.equal(across[0][5:], task.batch(0, n, 5)[0])


def test_teacher_offsets_index_samples_whatever_the_batch_sizes():
    # a replica whose batch size changes (diloco.balance) reads on, never a sample twice
    task = make_task(DataConfig(name="teacher"))
    whole = task.batch(0, 0, 512)
    pieces = [task.batch(0, 0, 100), task.batch(0, 100, 300), task.batch(0, 400, 112)]
    assert torch.equal(whole[0], torch.cat([x for x, _ in pieces]))
    assert torch.equal(whole[1], torch.cat([y for _, y in pieces]))
    assert len(torch.unique(whole[0][:, 0])) == 512


def test_config_knows_every_registered_task():
    # config.py names the tasks without importing torch (instant errors); keep them in step
    from distqat.config import TASK_NAMES
    from distqat.data import TASKS

    assert sorted(TASK_NAMES) == sorted(TASKS)
