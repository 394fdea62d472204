"""Core attention for the local layer spec on ``torch.nn.functional.scaled_dot_product_attention``.

megatron's unfused ``DotProductAttention`` materialises the [b, np, sq, sk] scores and softmax
probabilities (twice over for the backward) in the activation dtype: at 2,048 tokens and 16 heads
that is 256 MiB per layer in bf16 before the backward keeps its copies. SDPA picks a fused kernel
(flash / memory-efficient on CUDA, a blocked flash kernel on CPU) that never holds the whole score
matrix, and with ``is_causal`` it also skips the masked upper triangle.

It is a drop-in ``core_attention`` submodule: same constructor (it subclasses megatron's module,
so softmax scale, per-rank head counts and the ``sharded_state_dict`` are megatron's own), same
forward signature and layouts. Tensor parallelism needs nothing here: the heads a rank receives
are already its own shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPADotProductAttention(DotProductAttention):
    """megatron's ``DotProductAttention`` interface, computed by SDPA.

    ``attention_mask``: None means causal (SDPA's ``is_causal``, its fastest path); otherwise a bool
    mask broadcastable to [b, np, sq, sk], True = masked (megatron's convention, e.g. the
    block-diagonal causal mask of packed rows). Every query must be allowed at least one key (a
    causal mask always allows the diagonal): SDPA gives NaN for a fully masked row where megatron's
    softmax would spread the weight uniformly.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection)
        # Features the unfused module has and SDPA does not express: refuse rather than differ.
        if self.attention_dropout.p != 0.0:
            raise ValueError("SDPADotProductAttention: attention dropout must be 0 (the trainer sets 0)")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPADotProductAttention: softmax_type={config.softmax_type!r} unsupported")
        if config.window_size is not None:
            raise ValueError("SDPADotProductAttention: sliding-window attention unsupported")
        # megatron divides the score scale by the layer number and multiplies it back inside its
        # fp32 softmax; in exact arithmetic the product is the plain scale, which SDPA takes whole.
        self.sdpa_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPADotProductAttention: packed_seq_params / attention_bias unsupported "
                             "(packed rows pass a block-diagonal attention_mask instead)")
        sq, b, np_, hn = query.shape
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            # Same head -> group assignment as megatron's unfused path (head h reads group
            # h // groups); expanded rather than SDPA's enable_gqa, which not every backend takes.
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        # [s, b, n, h] -> [b, n, s, h]: SDPA's layout; a strided view, the kernels accept it.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.sdpa_scale)
        else:
            # SDPA's bool mask marks what may be attended; megatron's marks what is masked.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask.to(torch.bool),
                                                 scale=self.sdpa_scale)
        # [b, n, sq, h] -> [sq, b, n * h]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


def needs_explicit_causal_mask(model) -> bool:
    """Whether ``model`` runs megatron's unfused attention, which on CPU needs the causal mask
    passed in (it builds its default one on CUDA); SDPA handles ``None`` as causal anywhere."""
    return any(type(m) is DotProductAttention for m in model.modules())
