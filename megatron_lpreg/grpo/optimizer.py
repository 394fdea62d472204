"""AdamW for a tensor- and data-parallel megatron-core model, with fp32 master weights.

Each step: complete the gradients of replicated parameters that each TP rank only holds a part
of, average the gradients over the data-parallel group (fp32, bucketed), take the global gradient
norm across tensor-parallel shards, skip the step if that norm is not finite, else clip, step AdamW
on the fp32 masters and copy them back into the (bf16/fp16) model.

``shard_over_dp`` (ZeRO-1, what megatron's DistributedOptimizer does): all parameters are laid end
to end in one flat fp32 buffer, padded to a multiple of the DP size, and each DP rank keeps the fp32
master, exp_avg and exp_avg_sq of its 1/DP slice only, so the 12 B/param of optimizer state become
12/DP. Gradients are reduce-scattered (averaged) over DP instead of all-reduced, the norm is summed
over the local slices of every DP and TP rank, the clip and AdamW update touch the slice, and the
updated slices are all-gathered back into the model parameters. An fp32 model gets a master slice
too (its parameters are not one flat buffer that AdamW could update in place).

Checkpoints: ``state_dict`` is a plain per-rank dict. ``sharded_state_dict`` gives megatron
dist_checkpointing entries that reuse the model's own sharding, so an optimizer saved at one TP
size loads at another; the AdamW step count travels separately (``scalar_state``). They hold full
per-parameter tensors in both modes, so a checkpoint written with or without ``shard_over_dp``, at
any TP x DP layout, loads in the other mode and layout.
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


# torch 2.13 renamed the flat-tensor collectives (the old names warn); torch 2.6 has only the old ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _prefix(kind: str) -> str:
    return f"optimizer.{kind}."


@dataclass(frozen=True)
class StepResult:
    stepped: bool
    grad_norm: float
    lr: float


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _is_tp_sharded(param: torch.Tensor) -> bool:
    return getattr(param, "tensor_model_parallel", False)


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
    ``bucket_numel``: fp32 elements per all-reduce (data-parallel, and the TP sum of partial grads).

    Masters are copied from the model here: build the optimizer after loading weights, or call
    ``sync_master_from_model`` after changing the model's weights behind its back.

    ``shard_over_dp``: keep master and AdamW state only for this DP rank's 1/DP slice of the flat
    parameter buffer (module docstring). ``masters`` is then that one flat fp32 slice, and
    ``param_state`` / ``sharded_state_dict`` are collectives over ``dp_group`` (they gather full
    tensors). The gradients are reduce-scattered in one call over the whole flat buffer (no
    buckets). All params must be on one device.
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
        shard_over_dp: bool = False,
    ):
        self.model = model
        self.clip_grad = clip_grad
        self.dp_group = dp_group
        self.tp_group = tp_group
        self.bucket_numel = bucket_numel
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self._index = {n: i for i, (n, _) in enumerate(named)}
        self._tp_partial = [i for i, (n, p) in enumerate(named) if _tp_partial(n, p)]
        self.shard_over_dp = shard_over_dp
        if shard_over_dp:
            self._init_shard()
            self.masters = [self._shard]
        else:
            self.masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_()
                            for p in self.params]
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

    def _init_shard(self) -> None:
        dp = _group_size(self.dp_group)
        self._dp_rank = 0 if self.dp_group is None else dist.get_rank(self.dp_group)
        # Param i is flat[offsets[i]:offsets[i + 1]]; rank r owns flat[r * S:(r + 1) * S].
        self._offsets = [0]
        for p in self.params:
            self._offsets.append(self._offsets[-1] + p.numel())
        self._shard_numel = max(1, math.ceil(self._offsets[-1] / dp))
        self._flat_numel = self._shard_numel * dp
        lo, hi = self._dp_rank * self._shard_numel, (self._dp_rank + 1) * self._shard_numel
        # i -> (start, end) within param i and start within the slice, for the params this rank owns
        # (part of); the padding at the end of the last slice belongs to none and stays 0.
        self._segments = {}
        for i in range(len(self.params)):
            start, end = max(lo, self._offsets[i]), min(hi, self._offsets[i + 1])
            if start < end:
                self._segments[i] = (start - self._offsets[i], end - self._offsets[i], start - lo)
        # Gathered in the model's dtype (bf16: half the traffic of fp32); fp32 if the dtypes differ.
        dtypes = {p.dtype for p in self.params}
        self._gather_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        device = self.params[0].device if self.params else torch.device("cpu")
        self._shard = torch.zeros(self._shard_numel, dtype=torch.float32, device=device).requires_grad_()
        self.sync_master_from_model()

    def _own(self, i: int, full: torch.Tensor, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The elements of param i that this rank owns (``i in self._segments``): as a flat view
        of ``full``, a tensor shaped like the param, and of ``local``, one shaped like the slice."""
        start, end, at = self._segments[i]
        return full.detach().reshape(-1)[start:end], local[at:at + end - start]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None

    @torch.no_grad()
    def sync_master_from_model(self) -> None:
        if self.shard_over_dp:
            for i in self._segments:
                part, mine = self._own(i, self.params[i], self._shard)
                mine.copy_(part)
            return
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.copy_(p)

    @torch.no_grad()
    def step(self) -> StepResult:
        if self.shard_over_dp:
            grads = [self._shard_grad()]
            norm = self._shard_grad_norm(grads[0])
        else:
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
        if self.shard_over_dp:
            self._gather_params()
        else:
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m)
        self.zero_grad()
        return StepResult(stepped=True, grad_norm=norm, lr=lr)

    def _shard_grad(self) -> torch.Tensor:
        """This rank's slice of the flat fp32 gradient, averaged over DP (and set as the slice's
        ``.grad``). A missing gradient is zero, as in ``_master_grads``."""
        flat = torch.zeros(self._flat_numel, dtype=torch.float32, device=self._shard.device)
        for i, p in enumerate(self.params):
            if p.grad is not None:
                flat[self._offsets[i]:self._offsets[i + 1]].copy_(p.grad.reshape(-1))
                p.grad = None  # copied: free it now, the flat buffer is the step's peak
        self._all_reduce([flat[self._offsets[i]:self._offsets[i + 1]] for i in self._tp_partial],
                         self.tp_group, average=False)
        if _group_size(self.dp_group) == 1:
            grad = flat
        else:
            grad = torch.empty_like(self._shard)
            _reduce_scatter(grad, flat, group=self.dp_group)  # SUM, then divide: gloo has no AVG
            grad /= _group_size(self.dp_group)
        self._shard.grad = grad
        return grad

    def _shard_grad_norm(self, grad: torch.Tensor) -> float:
        """The global norm from the local slices: sum of squares over DP (each element is on one
        rank) and over TP, replicas counted once as in ``_global_grad_norm``."""
        parts = {True: [], False: []}
        for i in self._segments:
            _, mine = self._own(i, self.params[i], grad)
            parts[_is_tp_sharded(self.params[i])].append(mine)
        return self._norm(parts[True], parts[False], grad.device, [self.dp_group, self.tp_group])

    def _gather_params(self) -> None:
        """All-gather the updated slices over DP into the model parameters."""
        local = self._shard.detach().to(self._gather_dtype)
        if _group_size(self.dp_group) == 1:
            flat = local
        else:
            flat = torch.empty(self._flat_numel, dtype=self._gather_dtype, device=local.device)
            _all_gather(flat, local, group=self.dp_group)
        for i, p in enumerate(self.params):
            p.copy_(flat[self._offsets[i]:self._offsets[i + 1]].view_as(p))

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
        sharded = [g for p, g in zip(self.params, grads) if _is_tp_sharded(p)]
        replicated = [g for p, g in zip(self.params, grads) if not _is_tp_sharded(p)]
        device = grads[0].device if grads else torch.device("cpu")
        return self._norm(sharded, replicated, device, [self.tp_group])

    def _norm(self, sharded: list[torch.Tensor], replicated: list[torch.Tensor], device, groups) -> float:
        """sqrt of the sum of squares of ``sharded`` and (TP rank 0's) ``replicated`` gradients,
        summed over each of ``groups``."""
        tp_rank = 0 if self.tp_group is None else dist.get_rank(self.tp_group)

        def sum_sq(gs):
            if not gs:
                return torch.zeros((), dtype=torch.float64, device=device)
            return torch.stack(torch._foreach_norm(gs)).double().square().sum()

        # Replicas count on TP rank 0 only; the other ranks multiply theirs by 0 rather than drop
        # them, so an inf/nan in a replica on any rank still makes the norm non-finite everywhere.
        total = sum_sq(sharded) + sum_sq(replicated) * (1.0 if tp_rank == 0 else 0.0)
        for group in groups:
            if _group_size(group) > 1:
                dist.all_reduce(total, group=group)
        return math.sqrt(total.item())  # nan and inf pass through

    # -----------------------------------------------------------------------------------------
    # plain per-rank checkpoints

    def state_dict(self) -> dict:
        """This rank's state; loads only into the same mode and TP x DP layout."""
        if self.shard_over_dp:
            return {"adamw": self.optimizer.state_dict(), "master": {0: self._shard}}
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
        name): ``exp_avg``, ``exp_avg_sq`` and, for a bf16/fp16 parameter, its fp32 ``master``.

        The live tensors, or with ``shard_over_dp`` full copies gathered over DP: a collective,
        every DP rank must ask for the same names in the same order."""
        if name not in self._index:
            raise KeyError(f"{name!r} is not a parameter this optimizer trains")
        i = self._index[name]
        if self.shard_over_dp:
            state = self._state(self._shard)
            kinds = [*STATE_KEYS] + ([MASTER] if self.params[i].dtype != torch.float32 else [])
            return {k: self._gather_param(self._shard if k == MASTER else state[k], i) for k in kinds}
        master = self.masters[i]
        state = self._state(master)
        out = {k: state[k] for k in STATE_KEYS}
        if master is not self.params[i]:
            out[MASTER] = master
        return out

    @torch.no_grad()
    def _gather_param(self, local: torch.Tensor, i: int) -> torch.Tensor:
        """Param i's part of the flat buffer whose slice ``local`` this rank holds, all-gathered
        over DP into a full tensor shaped like the param. One all-gather per call: fine for
        checkpoints, not for every step."""
        dp, size = _group_size(self.dp_group), self._shard_numel
        begin, end = self._offsets[i], self._offsets[i + 1]
        # (start, length) of the piece of the param on each rank; equal-sized sends, so pad to the longest
        pieces = [(max(begin, r * size), max(0, min(end, (r + 1) * size) - max(begin, r * size)))
                  for r in range(dp)]
        width = max(n for _, n in pieces)
        start, n = pieces[self._dp_rank]
        send = local.new_zeros(width)
        at = start - self._dp_rank * size
        send[:n] = local[at:at + n]
        if dp == 1:
            return send.view_as(self.params[i])
        recv = local.new_empty(dp * width)
        _all_gather(recv, send, group=self.dp_group)
        full = torch.cat([recv[r * width:r * width + n] for r, (_, n) in enumerate(pieces)])
        return full.view_as(self.params[i])

    def sharded_state_dict(self, model_sharded: dict) -> dict:
        """Sharded entries of the optimizer tensors of the params in ``model_sharded``.

        With ``shard_over_dp`` a collective over DP: the entries are full per-parameter copies
        gathered from the slices (``param_state``), so the checkpoint is the same as without it.
        That costs one all-gather per tensor and, for a save or a load, 12 B (8 B for fp32) per
        parameter of the group of temporary memory: checkpoints are rare.

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
        into the optimizer (model weights are untouched: the model loads its own group). With
        ``shard_over_dp``, load the model first: an fp32 param's master slice is read from it."""
        kinds = (*STATE_KEYS, MASTER)
        for key, tensor in loaded.items():
            kind = next((k for k in kinds if key.startswith(_prefix(k))), None)
            if kind is None:
                raise KeyError(f"{key!r} is not an optimizer entry")
            if self.shard_over_dp:
                self._load_slice(key, kind, tensor)
                continue
            target = self.param_state(key[len(_prefix(kind)):]).get(kind)
            if target is None:
                raise KeyError(f"{key!r}: this optimizer keeps no fp32 master for that parameter")
            if tensor.shape != target.shape:
                raise ValueError(f"{key!r}: shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            if tensor.data_ptr() != target.data_ptr():
                target.copy_(tensor)

    def _load_slice(self, key: str, kind: str, tensor: torch.Tensor) -> None:
        """Copy this rank's part of a full per-parameter tensor into its slice."""
        name = key[len(_prefix(kind)):]
        if name not in self._index:
            raise KeyError(f"{name!r} is not a parameter this optimizer trains")
        i = self._index[name]
        param = self.params[i]
        if kind == MASTER and param.dtype == torch.float32:
            raise KeyError(f"{key!r}: this optimizer keeps no fp32 master for that parameter")
        if tensor.shape != param.shape:
            raise ValueError(f"{key!r}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        state = self._state(self._shard)
        target = self._shard if kind == MASTER else state[kind]
        if i in self._segments:
            part, mine = self._own(i, tensor, target)
            mine.copy_(part)
            if param.dtype == torch.float32:
                # An fp32 param's master is the param itself in the checkpoint: take the model's
                # (already loaded) weights, as the unsharded optimizer does by stepping them.
                part, mine = self._own(i, param, self._shard)
                mine.copy_(part)

    def scalar_state(self) -> dict:
        """The AdamW step count (the same for every parameter: each step updates all of them)."""
        steps = {int(s["step"]) for s in self.optimizer.state.values() if "step" in s}
        if len(steps) > 1:
            raise RuntimeError(f"parameters disagree on the AdamW step count: {sorted(steps)}")
        return {"step": steps.pop() if steps else 0}

    def load_scalar_state(self, state: dict) -> None:
        for m in self.masters:
            self._state(m)["step"].fill_(float(state["step"]))
