"""Checkpoint entries of ``PolicyOptimizer`` (a mixin: the methods read its parameters, masters,
AdamW state and, with ``shard_over_dp``, its ``FlatLayout``).

- ``state_dict`` / ``load_state_dict``: a plain per-rank dict; loads only into the same mode and
  TP x DP layout.
- ``sharded_state_dict`` / ``load_sharded_state_dict``: megatron dist_checkpointing entries that
  reuse the model's own sharding, so an optimizer saved at one TP size loads at another. They hold
  full per-parameter tensors in both modes, so a checkpoint written with or without
  ``shard_over_dp``, at any TP x DP layout, loads in the other mode and layout.
- ``scalar_state`` / ``load_scalar_state``: the AdamW step count, which travels separately (JSON).
- ``param_state``: one parameter's optimizer tensors, what the sharded entries are made of.
"""

from __future__ import annotations

import torch

from megatron_lpreg.policy import grads as finalize

# Sharded checkpoint entries are "<prefix><model state_dict name>"; the checkpoint keys inside are
# "<prefix><model checkpoint key>". "master" exists only for params kept in bf16/fp16.
STATE_KEYS = ("exp_avg", "exp_avg_sq")
MASTER = "master"


def _prefix(kind: str) -> str:
    return f"optimizer.{kind}."


class OptimizerStateMixin:
    """Reads ``optimizer`` (torch AdamW), ``params`` / ``masters`` / ``_index`` (name -> position),
    ``dp_group``, ``shard_over_dp`` and, when sharded, ``_shard`` (the fp32 master slice) and
    ``layout`` of the class it is mixed into."""

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

    def _adamw_state(self, master: torch.Tensor) -> dict:
        """AdamW creates its state on the first step; a checkpoint needs it before that."""
        state = self.optimizer.state[master]
        if not state:
            state["step"] = torch.tensor(0.0)  # as AdamW makes it (CPU, not capturable)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        return state

    def _param_index(self, name: str) -> int:
        if name not in self._index:
            raise KeyError(f"{name!r} is not a parameter this optimizer trains")
        return self._index[name]

    def param_state(self, name: str) -> dict[str, torch.Tensor]:
        """The optimizer tensors of model parameter ``name`` (its ``model.named_parameters()``
        name), each shaped like this TP rank's parameter: ``exp_avg``, ``exp_avg_sq`` and, for a
        bf16/fp16 parameter, its fp32 ``master``.

        The live tensors, or with ``shard_over_dp`` full copies gathered over DP: a collective,
        every DP rank must ask for the same names in the same order."""
        i = self._param_index(name)
        if self.shard_over_dp:
            state = self._adamw_state(self._shard)
            kinds = [*STATE_KEYS] + ([MASTER] if self.params[i].dtype != torch.float32 else [])
            return {k: self._gather_param(self._shard if k == MASTER else state[k], i) for k in kinds}
        master = self.masters[i]
        state = self._adamw_state(master)
        out = {k: state[k] for k in STATE_KEYS}
        if master is not self.params[i]:
            out[MASTER] = master
        return out

    @torch.no_grad()
    def _gather_param(self, local: torch.Tensor, i: int) -> torch.Tensor:
        """Param i's part of the flat buffer whose slice ``local`` this rank holds, all-gathered
        over DP into a full tensor shaped like the param. One all-gather per call: fine for
        checkpoints, not for every step."""
        pieces = self.layout.pieces(i)
        # all_gather sends equal sizes: every rank pads its piece to the longest.
        width = max(n for _, n in pieces)
        start, n = pieces[self.layout.dp_rank]
        send = local.new_zeros(width)
        at = start - self.layout.dp_rank * self.layout.shard_numel
        send[:n] = local[at:at + n]
        if self.layout.dp_size == 1:
            return send.view_as(self.params[i])
        recv = finalize.all_gather_over_dp(send, self.dp_group)
        full = torch.cat([recv[r * width:r * width + n] for r, (_, n) in enumerate(pieces)])
        return full.view_as(self.params[i])

    def sharded_state_dict(self, model_sharded: dict) -> dict:
        """Sharded entries of the optimizer tensors of the params in ``model_sharded``.

        With ``shard_over_dp`` a collective over DP: the entries are full per-parameter copies
        gathered from the slices (``param_state``), so the checkpoint is the same as without it.
        That costs one all-gather per tensor and, for a save or a load, 12 B (8 B for fp32) per
        parameter of the group of temporary memory: checkpoints are rare.

        ``model_sharded`` maps ``model.state_dict()`` names to the model's ShardedTensor /
        ShardedTensorFactory (e.g. ``model.sharded_state_dict()``, weights only). Build it afresh
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
        i = self._param_index(key[len(_prefix(kind)):])
        param = self.params[i]
        if kind == MASTER and param.dtype == torch.float32:
            raise KeyError(f"{key!r}: this optimizer keeps no fp32 master for that parameter")
        if tensor.shape != param.shape:
            raise ValueError(f"{key!r}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        state = self._adamw_state(self._shard)
        target = self._shard if kind == MASTER else state[kind]
        if i in self.layout.segments:
            part, mine = self.layout.own(i, tensor, target)
            mine.copy_(part)
            if param.dtype == torch.float32:
                # An fp32 param's master is the param itself in the checkpoint: take the model's
                # (already loaded) weights, as the unsharded optimizer does by stepping them.
                part, mine = self.layout.own(i, param, self._shard)
                mine.copy_(part)

    # -----------------------------------------------------------------------------------------
    # scalars

    def scalar_state(self) -> dict:
        """The AdamW step count (the same for every parameter: each step updates all of them)."""
        steps = {int(s["step"]) for s in self.optimizer.state.values() if "step" in s}
        if len(steps) > 1:
            raise RuntimeError(f"parameters disagree on the AdamW step count: {sorted(steps)}")
        return {"step": steps.pop() if steps else 0}

    def load_scalar_state(self, state: dict) -> None:
        for m in self.masters:
            self._adamw_state(m)["step"].fill_(float(state["step"]))
