"""distqat.optim against torch.optim: the same parameters bit for bit after many steps
(several groups, weight decay, parameters without gradients), state dicts that load
into each other, and no import of torch._dynamo (the reason the module exists)."""

import copy
import subprocess
import sys

import pytest
import torch

from distqat import optim

CASES = {
    "adamw": (optim.AdamW, torch.optim.AdamW,
              {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.1}),
    "adam": (optim.Adam, torch.optim.Adam, {"lr": 2e-3, "weight_decay": 0.01}),
    "adam-no-decay": (optim.Adam, torch.optim.Adam, {"lr": 1e-3}),
    "sgd-nesterov": (optim.SGD, torch.optim.SGD,
                     {"lr": 0.7, "momentum": 0.9, "nesterov": True}),
    "sgd-momentum-decay": (optim.SGD, torch.optim.SGD,
                           {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.01}),
    "sgd-plain": (optim.SGD, torch.optim.SGD, {"lr": 0.05}),
}


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=gen).requires_grad_(),
            torch.randn(5, generator=gen).requires_grad_(),
            torch.randn(3, 4, generator=gen).requires_grad_(),
            torch.randn(2, generator=gen).requires_grad_()]


def groups(params):
    # a second group with its own learning rate and no decay, as qat_param_groups makes
    return [{"params": params[:3]}, {"params": params[3:], "lr": 1e-4, "weight_decay": 0.0}]


def set_grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        # parameter 2 has no gradient every third step: skipped, its state untouched
        p.grad = None if (i == 2 and step % 3 == 0) else torch.randn(p.shape, generator=gen)


def run(opt, params, steps, first=0):
    for step in range(first, first + steps):
        set_grads(params, step)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("case", list(CASES))
def test_same_parameters_as_torch_bit_for_bit(case):
    ours_cls, torch_cls, kwargs = CASES[case]
    ours, theirs = make_params(), make_params()
    opt_ours, opt_torch = ours_cls(groups(ours), **kwargs), torch_cls(groups(theirs), **kwargs)
    run(opt_ours, ours, 25)
    run(opt_torch, theirs, 25)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b), case
        assert a.grad is None
    # the same state, in the same format
    sd_ours, sd_torch = opt_ours.state_dict(), opt_torch.state_dict()
    assert sd_ours["param_groups"] == sd_torch["param_groups"]
    assert sd_ours["state"].keys() == sd_torch["state"].keys()
    for i, values in sd_torch["state"].items():
        assert sd_ours["state"][i].keys() == values.keys()
        for key, value in values.items():
            assert torch.equal(sd_ours["state"][i][key], value), (case, i, key)
            assert sd_ours["state"][i][key].dtype == value.dtype


@pytest.mark.parametrize("case", ["adamw", "sgd-nesterov"])
def test_state_dicts_load_into_each_other(case):
    ours_cls, torch_cls, kwargs = CASES[case]
    reference = make_params()
    opt_ref = ours_cls(groups(reference), **kwargs)
    run(opt_ref, reference, 10)
    saved = copy.deepcopy(opt_ref.state_dict())  # live tensors: the reference goes on
    theirs = [p.detach().clone().requires_grad_() for p in reference]
    run(opt_ref, reference, 10, first=10)
    # ours -> torch -> ours, each resuming where the last left off
    opt_torch = torch_cls(groups(theirs), lr=0.5)  # settings come from the state dict
    opt_torch.load_state_dict(saved)
    run(opt_torch, theirs, 5, first=10)
    mine = [p.detach().clone().requires_grad_() for p in theirs]
    opt_mine = ours_cls(groups(mine), lr=0.5)
    opt_mine.load_state_dict(opt_torch.state_dict())
    run(opt_mine, mine, 5, first=15)
    for a, b in zip(reference, mine):
        assert torch.equal(a, b), case
    assert opt_mine.param_groups[1]["lr"] == 1e-4
    # a loaded state is a copy: stepping the loaded optimizer leaves the source alone
    before = {i: {k: v.clone() for k, v in s.items()} for i, s in opt_torch.state_dict()["state"].items()}
    run(opt_mine, mine, 1, first=20)
    after = opt_torch.state_dict()["state"]
    assert all(torch.equal(after[i][k], v) for i, s in before.items() for k, v in s.items())


def test_a_state_for_other_groups_is_refused():
    opt = optim.SGD(make_params(), lr=0.1, momentum=0.9)
    run(opt, opt.param_groups[0]["params"], 2)
    other = optim.SGD(groups(make_params()), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="parameter groups"):
        other.load_state_dict(opt.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.AdamW([])
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="more than one parameter group"):
        optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD([p], lr=0.1, nesterov=True)


def test_zero_grad_keeping_the_tensors():
    params = make_params()
    opt = optim.Adam(params)
    set_grads(params, 1)
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(params, grads))


def test_no_torch_dynamo_import():
    """Building, stepping and saving an optimizer, and a distqat stage's whole inner
    step, leave torch._dynamo unimported (torch.optim would import it)."""
    code = (
        "import sys, torch\n"
        "from distqat.diloco import build_optimizer\n"
        "from distqat.config import OptimConfig\n"
        "m = torch.nn.Linear(4, 2)\n"
        "for name in ('adamw', 'adam', 'sgd'):\n"
        "    opt = build_optimizer(m.parameters(), OptimConfig(name=name, momentum=0.9))\n"
        "    m(torch.randn(3, 4)).sum().backward()\n"
        "    opt.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
        "torch.optim.SGD(m.parameters(), lr=0.1)\n"  # the control: torch's does import it
        "assert 'torch._dynamo' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
