"""Vocab-parallel token statistics, the Lp-Reg regulariser and the policy-gradient objective."""

from megatron_lpreg.loss.config import PRESETS, LpRegConfig
from megatron_lpreg.loss.policy_loss import (
    aggregate, lp_reg_policy_loss, lp_reg_policy_loss_tensors, metrics_to_floats,
)
from megatron_lpreg.loss.proxy_kl import (
    vocab_parallel_forward_kl_to_proxy,
    vocab_parallel_reverse_kl_to_proxy,
)
from megatron_lpreg.loss.ref_kl import REF_KL_TYPES, ref_kl
from megatron_lpreg.loss.selection import (
    Selection, SelectionTensors, SelectionThresholds, select_tokens, select_tokens_tensors, selection_thresholds,
)
from megatron_lpreg.loss.shards import set_debug
from megatron_lpreg.loss.token_stats import (
    TokenStats,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_proxy_logprobs,
    vocab_parallel_token_stats,
)

__all__ = [
    "LpRegConfig", "PRESETS", "REF_KL_TYPES", "Selection", "SelectionThresholds", "TokenStats", "aggregate",
    "lp_reg_policy_loss", "lp_reg_policy_loss_tensors", "metrics_to_floats", "ref_kl", "select_tokens",
    "select_tokens_tensors", "SelectionTensors", "selection_thresholds", "set_debug",
    "vocab_parallel_entropy", "vocab_parallel_forward_kl_to_proxy", "vocab_parallel_logprobs",
    "vocab_parallel_proxy_logprobs", "vocab_parallel_reverse_kl_to_proxy",
    "vocab_parallel_token_stats",
]
