"""The arms of a pack as one stacked computation (`train.pack_compute: stacked`).

The per-arm loop runs K forward and backward passes of a small network one after another; on a
GPU each leaves the device mostly idle. Here the K models' weights are stacked along a new first
dimension (`torch.func.stack_module_state`) and one `vmap`ped `functional_call` runs every arm's
forward (and so its backward) at once. What each arm is stays its own: its weights are views into
the stack (each arm's module keeps working for its EMA, evals and checkpoints), AdamW over the
stacked tensors is AdamW per arm (it is elementwise, and the arms share lr and weight decay),
gradient clipping is per arm, and with several ranks each gradient is averaged across them as DDP
would. Results equal the loop's up to floating-point reassociation in the batched kernels
(tests/test_stacked.py states the tolerance).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
from torch.func import functional_call, stack_module_state, vmap

from trainables.diffusion.diffusion import predict_epsilon
from trainables.diffusion.model import unwrap


class StackedArms:
    def __init__(self, models: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer],
                 lr: float, weight_decay: float):
        plain = [unwrap(m) for m in models]
        self.models = plain
        self.params, self.buffers = stack_module_state(plain)
        self.names = list(self.params)
        self.template = copy.deepcopy(plain[0]).to("meta")
        for k, model in enumerate(plain):  # each arm's weights: views into the stack
            for name, p in model.named_parameters():
                p.data = self.params[name].data[k]
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=weight_decay)
        self._load_optimizers(optimizers)

    def __len__(self) -> int:
        return len(self.models)

    # ------------------------------------------------------------------ a step

    def losses(self, x_t: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor],
               noise: torch.Tensor) -> torch.Tensor:
        """Per-sample ε losses (K, B) of the K arms on their inputs x_t (K, B, ...) at t (K, B)."""
        def one(params, buffers, x, tt):
            return predict_epsilon(lambda *a, **kw: functional_call(self.template, (params, buffers), a, kw),
                                   x, tt, labels)

        eps = vmap(one, randomness="different")(self.params, self.buffers, x_t, t)
        return (eps.float() - noise.float()).square().flatten(2).mean(dim=2)

    def step(self, loss: torch.Tensor, lr: float, grad_clip: float) -> None:
        """Backward of every arm's loss (K,), gradients averaged across ranks, clipped per arm,
        one AdamW step of the stack."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # the arms' weights are disjoint: each gets its own gradient
        grads = [self.params[n].grad for n in self.names]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for g in grads:
                dist.all_reduce(g)
                g.div_(world)
        if grad_clip > 0:  # as clip_grad_norm_, per arm: coefficient max_norm / (‖g‖ + 1e-6), at most 1
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
            coef = (grad_clip / (norms + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
        self.optimizer.step()

    # ------------------------------------------------------------------ optimizer state, per arm

    def _load_optimizers(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """The stack's AdamW state from the arms' own (a resumed pack's, or a restack's)."""
        states = [o.state_dict()["state"] for o in optimizers]
        if not all(states):
            return
        for i, name in enumerate(self.names):
            per_arm = [s[i] for s in states]
            self.optimizer.state[self.params[name]] = {
                "step": per_arm[0]["step"].clone(),
                "exp_avg": torch.stack([s["exp_avg"] for s in per_arm]).to(self.params[name].device),
                "exp_avg_sq": torch.stack([s["exp_avg_sq"] for s in per_arm]).to(self.params[name].device),
            }

    def store_optimizers(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Each arm's slice of the stack's AdamW state into the arm's own optimizer (for its
        checkpoint, or before a restack without an arm that ended)."""
        for k, opt in enumerate(optimizers):
            saved = opt.state_dict()
            state = {}
            for i, name in enumerate(self.names):
                s = self.optimizer.state.get(self.params[name])
                if s:
                    state[i] = {"step": s["step"].clone(), "exp_avg": s["exp_avg"][k].clone(),
                                "exp_avg_sq": s["exp_avg_sq"][k].clone()}
            opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})

    def release(self) -> None:
        """Give every arm's weights storage of their own again (before a restack)."""
        for model in self.models:
            for p in model.parameters():
                p.data = p.data.clone()
