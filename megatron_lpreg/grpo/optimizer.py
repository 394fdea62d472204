"""AdamW for a tensor- and data-parallel megatron-core model, with fp32 master weights.

Each step: complete the gradients of replicated parameters that each TP rank only holds a part
of, average the gradients over the data-parallel group (fp32, bucketed), take the global gradient
norm across tensor-parallel shards, skip the step if that norm is not finite, else clip, step AdamW
on the fp32 masters and copy them back into the (bf16/fp16) model.

Checkpoints: ``state_dict`` is a plain per-rank dict. ``sharded_state_dict`` gives megatron
dist_checkpointing entries that reuse the model's own sharding, so an optimizer saved at one TP
size loads at another; the AdamW step count travels separately (``scalar_state``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Sharded checkpoint entries are "<prefix><model state_dict name>"; the checkpoint keys inside are
# "<prefix><model checkpoint key>". "master" exists only for params kept in bf16/fp16.
STATE_KEYS = ("exp_avg", "exp_avg_sq")
MASTER = "master"


def _prefix(kind: str) -> str:
    return f"optimizer.{kind}."


@dataclass(frozen=True)
class StepResult:
    stepped: bool
    grad_norm: float
    lr: float


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tp_partial(name: str, param: torch.nn.Parameter) -> bool:
    """A replicated parameter whose gradient each TP rank holds only part of, so the parts must be
    summed over TP (megatron's ``finalize_model_grads`` does the same): q/k layernorms see only
    the rank's heads, sequence-parallel norms only the rank's tokens."""
    if getattr(param, "tensor_model_parallel", False):
        return False
    return "q_layernorm" in name or "k_layernorm" in name or getattr(param, "sequence_parallel", False)


class PolicyOptimizer:
    """AdamW over every trainable parameter of ``model`` (one param group).

    ``dp_group``: gradients are averaged over it. ``tp_group``: the gradient norm sums over it;
    params with ``tensor_model_parallel = True`` are shards, the rest are replicas counted once
    (their gradients must agree over TP: ``_tp_partial`` ones are summed over it first).
    ``bucket_numel``: fp32 elements per data-parallel all-reduce.

    Masters are copied from the model here: build the optimizer after loading weights, or call
    ``sync_master_from_model`` after changing the model's weights behind its back.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip_grad: float | None = 1.0,
        dp_group=None,
        tp_group=None,
        bucket_numel: int = 2**24,
    ):
        self.model = model
        self.clip_grad = clip_grad
        self.dp_group = dp_group
        self.tp_group = tp_group
        self.bucket_numel = bucket_numel
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_()
                        for p in self.params]
        self._index = {n: i for i, (n, _) in enumerate(named)}
        self._tp_partial = [i for i, (n, p) in enumerate(named) if _tp_partial(n, p)]
        self.optimizer = torch.optim.AdamW(
            self.masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    # -----------------------------------------------------------------------------------------
    # stepping

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.grad = None
            m.grad = None

    @torch.no_grad()
    def sync_master_from_model(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.copy_(p)

    @torch.no_grad()
    def step(self) -> StepResult:
        grads = self._master_grads()
        self._all_reduce([grads[i] for i in self._tp_partial], self.tp_group, average=False)
        self._all_reduce(grads, self.dp_group, average=True)
        norm = self._global_grad_norm(grads)
        lr = self.lr
        if not math.isfinite(norm):
            self.zero_grad()
            return StepResult(stepped=False, grad_norm=norm, lr=lr)
        if self.clip_grad is not None and self.clip_grad > 0 and norm > self.clip_grad:
            torch._foreach_mul_(grads, self.clip_grad / (norm + 1e-6))
        self.optimizer.step()
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)
        self.zero_grad()
        return StepResult(stepped=True, grad_norm=norm, lr=lr)

    def _master_grads(self) -> list[torch.Tensor]:
        """fp32 gradient of every master (set as its ``.grad``). A missing gradient is zero, so
        every rank takes part in the same collectives and AdamW updates every parameter."""
        grads = []
        for p, m in zip(self.params, self.masters):
            g = torch.zeros_like(m) if p.grad is None else p.grad.to(torch.float32)
            m.grad = g
            grads.append(g)
        return grads

    def _all_reduce(self, grads: list[torch.Tensor], group, average: bool) -> None:
        if _group_size(group) == 1:
            return
        bucket: list[torch.Tensor] = []
        numel = 0
        for g in grads:
            if bucket and (numel + g.numel() > self.bucket_numel or g.device != bucket[0].device):
                self._all_reduce_bucket(bucket, group, average)
                bucket, numel = [], 0
            bucket.append(g)
            numel += g.numel()
        if bucket:
            self._all_reduce_bucket(bucket, group, average)

    @staticmethod
    def _all_reduce_bucket(bucket: list[torch.Tensor], group, average: bool) -> None:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)  # SUM, then divide: gloo has no AVG
        if average:
            flat /= _group_size(group)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _global_grad_norm(self, grads: list[torch.Tensor]) -> float:
        tp_rank = 0 if self.tp_group is None else dist.get_rank(self.tp_group)
        sharded = [g for p, g in zip(self.params, grads) if getattr(p, "tensor_model_parallel", False)]
        replicated = [g for p, g in zip(self.params, grads) if not getattr(p, "tensor_model_parallel", False)]
        device = grads[0].device if grads else torch.device("cpu")

        def sum_sq(gs):
            if not gs:
                return torch.zeros((), dtype=torch.float64, device=device)
            return torch.stack(torch._foreach_norm(gs)).double().square().sum()

        # Replicas count on TP rank 0 only; the other ranks multiply theirs by 0 rather than drop
        # them, so an inf/nan in a replica on any rank still makes the norm non-finite everywhere.
        total = sum_sq(sharded) + sum_sq(replicated) * (1.0 if tp_rank == 0 else 0.0)
        if _group_size(self.tp_group) > 1:
            dist.all_reduce(total, group=self.tp_group)
        return math.sqrt(total.item())  # nan and inf pass through

    # -----------------------------------------------------------------------------------------
    # plain per-rank checkpoints

    def state_dict(self) -> dict:
        return {
            "adamw": self.optimizer.state_dict(),
            "master": {i: m for i, (p, m) in enumerate(zip(self.params, self.masters)) if m is not p},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["adamw"])
        for i, tensor in state["master"].items():
            self.masters[i].copy_(tensor)

    # -----------------------------------------------------------------------------------------
    # megatron dist_checkpointing

    def _state(self, master: torch.Tensor) -> dict:
        """AdamW creates its state on the first step; a checkpoint needs it before that."""
        state = self.optimizer.state[master]
        if not state:
            state["step"] = torch.tensor(0.0)  # as AdamW makes it (CPU, not capturable)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        return state

    def param_state(self, name: str) -> dict[str, torch.Tensor]:
        """The optimizer tensors of model parameter ``name`` (its ``model.named_parameters()``
        name): ``exp_avg``, ``exp_avg_sq`` and, for a bf16/fp16 parameter, its fp32 ``master``."""
        if name not in self._index:
            raise KeyError(f"{name!r} is not a parameter this optimizer trains")
        i = self._index[name]
        master = self.masters[i]
        state = self._state(master)
        out = {k: state[k] for k in STATE_KEYS}
        if master is not self.params[i]:
            out[MASTER] = master
        return out

    def sharded_state_dict(self, model_sharded: dict) -> dict:
        """Sharded entries of the optimizer tensors of the params in ``model_sharded``.

        ``model_sharded`` maps ``model.state_dict()`` names to the model's ShardedTensor /
        ShardedTensorFactory (e.g. ``checkpointing.group_sharded_state_dict``). Build it afresh
        for this call: ``dist_checkpointing.save`` replaces factories in the dict it is given.
        """
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

        out = {}
        for name, model_entry in model_sharded.items():
            for kind, tensor in self.param_state(name).items():
                out[_prefix(kind) + name] = make_sharded_optimizer_tensor(
                    model_entry, tensor, prefix=_prefix(kind).rstrip("."))
        return out

    @torch.no_grad()
    def load_sharded_state_dict(self, loaded: dict) -> None:
        """Copy what ``dist_checkpointing.load(self.sharded_state_dict(...), dir)`` returned back
        into the optimizer (model weights are untouched: the model loads its own group)."""
        kinds = (*STATE_KEYS, MASTER)
        for key, tensor in loaded.items():
            kind = next((k for k in kinds if key.startswith(_prefix(k))), None)
            if kind is None:
                raise KeyError(f"{key!r} is not an optimizer entry")
            target = self.param_state(key[len(_prefix(kind)):]).get(kind)
            if target is None:
                raise KeyError(f"{key!r}: this optimizer keeps no fp32 master for that parameter")
            if tensor.shape != target.shape:
                raise ValueError(f"{key!r}: shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            if tensor.data_ptr() != target.data_ptr():
                target.copy_(tensor)

    def scalar_state(self) -> dict:
        """The AdamW step count (the same for every parameter: each step updates all of them)."""
        steps = {int(s["step"]) for s in self.optimizer.state.values() if "step" in s}
        if len(steps) > 1:
            raise RuntimeError(f"parameters disagree on the AdamW step count: {sorted(steps)}")
        return {"step": steps.pop() if steps else 0}

    def load_scalar_state(self, state: dict) -> None:
        for m in self.masters:
            self._state(m)["step"].fill_(float(state["step"]))
