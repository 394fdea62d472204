"""AdamW for a tensor- and data-parallel megatron-core model, with fp32 master weights.

Each step finalises the gradients (``grads``: TP sums of partial gradients, the DP average, the
global norm), skips the step if that norm is not finite, else clips, steps AdamW on the fp32
masters and copies them back into the (bf16/fp16) model.

``shard_over_dp`` (ZeRO-1, what megatron's DistributedOptimizer does): all parameters are laid end
to end in one flat fp32 buffer (``FlatLayout``), padded to a multiple of the DP size, and each DP
rank keeps the fp32 master, exp_avg and exp_avg_sq of its 1/DP slice only, so the 12 B/param of
optimizer state become 12/DP. Gradients are reduce-scattered (averaged) over DP instead of
all-reduced, the norm is summed over the local slices of every DP and TP rank, the clip and AdamW
update touch the slice, and the updated slices are all-gathered back into the model parameters. An
fp32 model gets a master slice too (its parameters are not one flat buffer that AdamW could update
in place).

Gradients of a parameter that is not fp32 accumulate in fp32 (megatron DDP's main grads): bf16
sums of many micro-batches lose ~1e-2 relative accuracy (8 bits of mantissa) before the fp32
master ever sees them. A post-accumulate-grad hook adds each backward's ``p.grad`` into the
parameter's span of one flat fp32 buffer laid out like ``FlatLayout`` (for ZeRO-1 it is the buffer
that is reduce-scattered) and frees ``p.grad``. The buffer lives from the first backward of a step
to ``zero_grad``, so between steps (the rollout) it holds no memory. fp32 parameters keep plain
``p.grad`` (no hook, the same arithmetic as without main grads). The latest optimizer built over a
model owns its hooks.

Checkpoint entries (plain and megatron dist_checkpointing) are in ``optimizer_state``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from megatron_lpreg.parallel import group_rank, group_size
from megatron_lpreg.policy import grads as finalize
from megatron_lpreg.policy.lr_schedule import LRSchedule
from megatron_lpreg.policy.optimizer_state import OptimizerStateMixin


@dataclass(frozen=True)
class StepResult:
    stepped: bool  # False: a non-finite norm skipped the step (weights and state untouched)
    grad_norm: float  # before clipping
    lr: float


@dataclass(frozen=True)
class FlatLayout:
    """Where each parameter lies in the ZeRO-1 flat buffer, and which part this DP rank owns.

    Param i is ``flat[offsets[i]:offsets[i + 1]]`` (its ``reshape(-1)`` order); the buffer is
    ``shard_numel * dp_size`` long and DP rank r owns ``flat[r * shard_numel:(r + 1) * shard_numel]``.
    ``segments[i] = (start, end, at)``: this rank owns elements ``start:end`` of param i, at ``at``
    in its slice; params it owns nothing of are absent. The padding at the end of the last slice
    belongs to no param and stays 0."""

    offsets: tuple[int, ...]
    shard_numel: int
    dp_size: int
    dp_rank: int
    segments: dict[int, tuple[int, int, int]]

    @classmethod
    def build(cls, params: list[torch.Tensor], dp_size: int, dp_rank: int) -> FlatLayout:
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        shard_numel = max(1, math.ceil(offsets[-1] / dp_size))
        lo, hi = dp_rank * shard_numel, (dp_rank + 1) * shard_numel
        segments = {}
        for i in range(len(params)):
            start, end = max(lo, offsets[i]), min(hi, offsets[i + 1])
            if start < end:
                segments[i] = (start - offsets[i], end - offsets[i], start - lo)
        return cls(tuple(offsets), shard_numel, dp_size, dp_rank, segments)

    @property
    def flat_numel(self) -> int:
        return self.shard_numel * self.dp_size

    def span(self, i: int) -> slice:
        """Param i's elements in the flat buffer."""
        return slice(self.offsets[i], self.offsets[i + 1])

    def own(self, i: int, full: torch.Tensor, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The elements of param i that this rank owns (``i in segments``): as a flat view of
        ``full``, a tensor shaped like the param, and of ``local``, one shaped like the slice."""
        start, end, at = self.segments[i]
        return full.detach().reshape(-1)[start:end], local[at:at + end - start]

    def pieces(self, i: int) -> list[tuple[int, int]]:
        """(flat start, length) of the part of param i on each DP rank, in rank order."""
        begin, end, size = self.offsets[i], self.offsets[i + 1], self.shard_numel
        return [(max(begin, r * size), max(0, min(end, (r + 1) * size) - max(begin, r * size)))
                for r in range(self.dp_size)]


class PolicyOptimizer(OptimizerStateMixin):
    """AdamW over every trainable parameter of ``model`` (one param group).

    ``dp_group``: gradients are averaged over it. ``tp_group``: the gradient norm sums over it;
    params with ``tensor_model_parallel = True`` are shards, the rest are replicas counted once
    (their gradients must agree over TP: ``grads.is_tp_partial`` ones are summed over it first).
    None (or a group of one) means no such parallelism. ``bucket_numel``: fp32 elements per
    all-reduce (data-parallel, and the TP sum of partial grads).

    Masters are copied from the model here: build the optimizer after loading weights.

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
        lr_schedule: LRSchedule | None = None,
    ):
        self.model = model
        self.clip_grad = clip_grad
        self.dp_group = dp_group
        self.tp_group = tp_group
        self.bucket_numel = bucket_numel
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self._index = {n: i for i, (n, _) in enumerate(named)}
        self._tp_partial = [i for i, (n, p) in enumerate(named) if finalize.is_tp_partial(n, p)]
        self.shard_over_dp = shard_over_dp
        if shard_over_dp:
            self._init_shard()
            self.masters = [self._shard]
        else:
            self.masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_()
                            for p in self.params]
        self.optimizer = torch.optim.AdamW(
            self.masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        # Sets each param group's lr and weight decay; without a schedule the rate stays ``lr``.
        self.scheduler = (lr_schedule or LRSchedule(lr=lr)).scheduler(self.optimizer, weight_decay)
        self._init_main_grads()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_schedule_step(self, completed_steps: int) -> None:
        """Put the learning rate where the schedule has it after ``completed_steps`` GRPO steps
        (a function of the step alone, so a resumed run continues it exactly)."""
        self.scheduler.num_steps = completed_steps
        self.scheduler.step(0)

    def _init_shard(self) -> None:
        self.layout = FlatLayout.build(self.params, group_size(self.dp_group), group_rank(self.dp_group))
        # Gathered in the model's dtype (bf16: half the traffic of fp32); fp32 if the dtypes differ.
        dtypes = {p.dtype for p in self.params}
        self._gather_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        device = self.params[0].device if self.params else torch.device("cpu")
        self._shard = torch.zeros(self.layout.shard_numel, dtype=torch.float32, device=device).requires_grad_()
        with torch.no_grad():
            for i in self.layout.segments:
                part, mine = self.layout.own(i, self.params[i], self._shard)
                mine.copy_(part)

    def _init_main_grads(self) -> None:
        self._hooked = {i for i, p in enumerate(self.params) if p.dtype != torch.float32}
        self._main_flat: torch.Tensor | None = None
        if not self._hooked:
            return
        self._main_layout = self.layout if self.shard_over_dp else FlatLayout.build(self.params, 1, 0)
        # A weak reference: the model (hook) must not keep a replaced optimizer alive, and a dead
        # one's hook must leave p.grad alone.
        ref = weakref.ref(self)

        def hook(i: int) -> None:
            opt = ref()
            if opt is not None:
                opt._accumulate(i)

        for i in self._hooked:
            p = self.params[i]
            old = getattr(p, "_lpreg_main_grad_hook", None)
            if old is not None:  # an earlier optimizer over this model: only one may take p.grad
                old.remove()
            p._lpreg_main_grad_hook = p.register_post_accumulate_grad_hook(lambda _, i=i: hook(i))

    def _main_buffer(self) -> torch.Tensor:
        if self._main_flat is None:
            # Zeros also keep the ZeRO-1 padding and untouched params at 0.
            self._main_flat = torch.zeros(self._main_layout.flat_numel, dtype=torch.float32,
                                          device=self.params[0].device)
        return self._main_flat

    def _main_grad(self, i: int) -> torch.Tensor:
        return self._main_buffer()[self._main_layout.span(i)].view_as(self.params[i])

    def _accumulate(self, i: int) -> None:
        p = self.params[i]
        if p.grad is not None:
            with torch.no_grad():
                self._main_grad(i).add_(p.grad)
            p.grad = None

    def _fold_pending(self) -> None:
        """Gradients that reached ``p.grad`` without the hook (assigned directly) join the buffer."""
        for i in self._hooked:
            self._accumulate(i)

    def grads(self) -> list[torch.Tensor | None]:
        """Per parameter (``self.params`` order), the gradient the next ``step`` reads, None where
        there is none yet: the fp32 main grad of a non-fp32 parameter, else ``p.grad``. Writing
        into them changes the step (fault injection poisons these)."""
        self._fold_pending()
        return [(self._main_grad(i) if self._main_flat is not None else None) if i in self._hooked
                else p.grad for i, p in enumerate(self.params)]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None
        self._main_flat = None

    @torch.no_grad()
    def step(self) -> StepResult:
        """One update from ``grads()`` (this rank's micro-batches, summed), which it clears. A collective over ``tp_group`` and ``dp_group``: every rank calls it each step,
        also one whose loss reached no parameter."""
        self._fold_pending()
        if self.shard_over_dp:
            grads = [self._shard_grad()]
            norm = self._shard_grad_norm(grads[0])
        else:
            grads = self._master_grads()
            finalize.sum_partial_over_tp([grads[i] for i in self._tp_partial], self.tp_group, self.bucket_numel)
            finalize.average_over_dp(grads, self.dp_group, self.bucket_numel)
            device = grads[0].device if grads else torch.device("cpu")
            norm = finalize.grad_norm(self.params, grads, device=device, tp_group=self.tp_group)
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

    def _master_grads(self) -> list[torch.Tensor]:
        """fp32 gradient of every master (set as its ``.grad``). A missing gradient is zero, so
        every rank takes part in the same collectives and AdamW updates every parameter."""
        grads = []
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            if i in self._hooked:
                g = self._main_grad(i) if self._main_flat is not None else torch.zeros_like(m)
            else:
                g = torch.zeros_like(m) if p.grad is None else p.grad.to(torch.float32)
            m.grad = g
            grads.append(g)
        return grads

    def _shard_grad(self) -> torch.Tensor:
        """This rank's slice of the flat fp32 gradient, averaged over DP (and set as the slice's
        ``.grad``). A missing gradient is zero, as in ``_master_grads``."""
        if self._main_flat is not None:
            flat = self._main_flat
        else:
            flat = torch.zeros(self.layout.flat_numel, dtype=torch.float32, device=self._shard.device)
        for i, p in enumerate(self.params):
            if i not in self._hooked and p.grad is not None:
                flat[self.layout.span(i)].copy_(p.grad.reshape(-1))
                p.grad = None  # copied: free it now, the flat buffer is the step's peak
        finalize.sum_partial_over_tp([flat[self.layout.span(i)] for i in self._tp_partial],
                                     self.tp_group, self.bucket_numel)
        grad = finalize.reduce_scatter_over_dp(flat, self.dp_group)
        self._shard.grad = grad
        return grad

    def _shard_grad_norm(self, grad: torch.Tensor) -> float:
        """The global norm from the local slices: each element is on one DP rank, so the sum of
        squares runs over DP as well as TP."""
        owned = list(self.layout.segments)
        parts = [self.layout.own(i, self.params[i], grad)[1] for i in owned]
        return finalize.grad_norm([self.params[i] for i in owned], parts, device=grad.device,
                                  tp_group=self.tp_group, dp_group=self.dp_group)

    def _gather_params(self) -> None:
        """All-gather the updated slices over DP into the model parameters."""
        flat = finalize.all_gather_over_dp(self._shard.detach().to(self._gather_dtype), self.dp_group)
        for i, p in enumerate(self.params):
            p.copy_(flat[self.layout.span(i)].view_as(p))
