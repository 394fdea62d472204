"""grads without process groups (one rank): which params are TP partial, the norm's float64 sum and
its replica rule, and collectives that are no-ops alone. The groups themselves are exercised through
PolicyOptimizer in test_optimizer_parallel."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.policy import grads


def _param(shape, **marks) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(shape))
    for k, v in marks.items():
        setattr(p, k, v)
    return p


def test_tp_partial_params_are_replicas_whose_grads_are_split_over_tp():
    assert grads.is_tp_partial("decoder.layers.0.self_attention.q_layernorm.weight", _param(4))
    assert grads.is_tp_partial("decoder.layers.0.self_attention.k_layernorm.weight", _param(4))
    assert grads.is_tp_partial("decoder.final_layernorm.weight", _param(4, sequence_parallel=True))
    assert not grads.is_tp_partial("decoder.final_layernorm.weight", _param(4))
    sharded = _param(4, tensor_model_parallel=True, sequence_parallel=True)
    assert grads.is_tp_sharded(sharded) and not grads.is_tp_partial("q_layernorm", sharded)


def test_grad_norm_alone_is_the_norm_of_all_grads():
    params = [_param((3, 2), tensor_model_parallel=True), _param(5)]
    gs = [torch.full((3, 2), 2.0), torch.full((5,), 1.0)]
    norm = grads.grad_norm(params, gs, device=torch.device("cpu"), tp_group=None, dp_group=None)
    assert norm == pytest.approx(math.sqrt(6 * 4.0 + 5 * 1.0), rel=1e-7)  # per-tensor norms are fp32
    assert grads.grad_norm([], [], device=torch.device("cpu"), tp_group=None) == 0.0
    gs[1][0] = math.inf  # a replica's inf is never dropped
    assert grads.grad_norm(params, gs, device=torch.device("cpu"), tp_group=None) == math.inf


def test_collectives_alone_leave_the_grads_as_they_are():
    g = [torch.arange(6.0).view(2, 3), torch.ones(4)]
    before = [t.clone() for t in g]
    grads.sum_partial_over_tp(g, None, bucket_numel=1)
    grads.average_over_dp(g, None, bucket_numel=1)
    assert all(torch.equal(a, b) for a, b in zip(g, before))
    flat = torch.arange(8.0)
    assert grads.reduce_scatter_over_dp(flat, None) is flat
    assert grads.all_gather_over_dp(flat, None) is flat
