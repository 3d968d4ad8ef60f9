"""The inner and outer optimizers: AdamW, Adam and SGD (momentum, Nesterov), with the
arithmetic of ``torch.optim``'s single-tensor path (its default on CPU), bit for bit, and
its ``state_dict`` format (the same keys, parameters by index), so a state saved by one
loads into the other.

Why not ``torch.optim`` itself: building any ``torch.optim.Optimizer`` (its
``add_param_group``) and every ``step`` import ``torch._dynamo``, and with it the compiler
stack (sympy, inductor, FSDP): about 1.1 s of CPU per process, 40 % of what a worker
spends before its first step. torchrun restarts every worker of every host at each
membership change, so a recovery with 4 workers on 2 cores waited ~2 s for an import of a
compiler we never use. What we need of an optimizer is small and is pinned here by tests
against ``torch.optim`` (tests/test_optim.py).

Not covered (not used by distqat): amsgrad, maximize, dampening, sparse gradients,
complex parameters, tensor learning rates, and the foreach/fused kernels torch picks on
CUDA (a GPU step here is the same per-tensor loop).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List

import torch


class Optimizer:
    """Parameter groups, per-parameter state, ``zero_grad`` and (de)serialisation, as in
    ``torch.optim.Optimizer``; subclasses implement :meth:`step`."""

    def __init__(self, params: Iterable, defaults: Dict[str, Any]):
        self.defaults = defaults
        self.state: Dict[torch.Tensor, Dict[str, Any]] = {}
        self.param_groups: List[Dict[str, Any]] = []
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: Dict[str, Any]) -> None:
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params) or len({id(p) for p in params}) != len(params):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append({**self.defaults, **group, "params": params})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().requires_grad_(False).zero_()

    def state_dict(self) -> Dict[str, Any]:
        """torch's format: ``state`` keyed by the parameter's index across the groups, and
        the groups' settings with ``params`` as those indices (the tensors are live)."""
        index: Dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append(packed)
        state = {index[id(p)]: s for p, s in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Settings and state from :meth:`state_dict` (or a torch optimizer's); the state's
        tensors are copied to each parameter's device (and its dtype, but ``step``)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"])
                for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError("the optimizer state does not match this optimizer's parameter "
                             "groups (was the model changed?)")
        by_index = {}
        for saved, group in zip(saved_groups, self.param_groups):
            by_index.update(zip(saved["params"], group["params"]))
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = {}
        for i, values in state_dict["state"].items():
            p = by_index[int(i)]
            self.state[p] = {k: _to_param(k, v, p) for k, v in values.items()}


def _to_param(key: str, value: Any, param: torch.Tensor) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step":  # torch keeps the step count in float32 on the CPU
        return value.clone()
    return value.to(device=param.device, dtype=param.dtype, copy=True)


class Adam(Optimizer):
    """Adam; with ``decoupled_weight_decay`` (see :class:`AdamW`) the decay shrinks the
    weights directly instead of joining the gradient."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False):
        super().__init__(params, {
            "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
            "differentiable": False, "fused": None,
            "decoupled_weight_decay": decoupled_weight_decay})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, weight_decay = group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state.get(p)
                if not state:
                    state = self.state[p] = {
                        "step": torch.tensor(0.0, dtype=torch.float32),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                state["step"] += 1
                if weight_decay != 0:
                    if group["decoupled_weight_decay"]:
                        p.mul_(1 - lr * weight_decay)
                    else:
                        grad = grad.add(p, alpha=weight_decay)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = state["step"].item()
                bias_correction1 = 1 - beta1 ** step
                bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=True)


class SGD(Optimizer):
    """SGD with optional (Nesterov) momentum and weight decay; the momentum buffer starts
    as the first gradient, as in torch."""

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        super().__init__(params, {
            "lr": lr, "momentum": momentum, "dampening": 0, "weight_decay": weight_decay,
            "nesterov": nesterov, "maximize": False, "foreach": None,
            "differentiable": False, "fused": None})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if weight_decay != 0:
                    grad = grad.add(p, alpha=weight_decay)
                if momentum != 0:
                    state = self.state.setdefault(p, {})
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.detach().clone()
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
                    grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(grad, alpha=-lr)

