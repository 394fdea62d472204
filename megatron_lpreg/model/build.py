"""A megatron-core GPTModel for a ModelSpec, and its forward pass to vocab-sharded logits.

The model takes its tensor-parallel size from megatron's ``parallel_state`` (set up by
``megatron_lpreg.parallel.init_distributed``); it never sees a process group itself. Weights come
from ``megatron_lpreg.weights`` (this module only builds the architecture).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lpreg.model.hf_config import ModelSpec, check_tp, padded_vocab_size


class ModelBuildError(RuntimeError):
    """The requested build cannot be made in this environment (e.g. TE asked for but absent)."""


def transformer_engine_available() -> bool:
    """TE is used only on GPU and only if it imports; it is never required."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE install (ABI mismatch) must not break training
        return False
    return True


RECOMPUTE = ("none", "full")
# Core attention of the local layer spec: "sdpa" (torch's fused scaled_dot_product_attention, the
# default) or "unfused" (megatron's DotProductAttention: explicit scores and softmax; kept as the
# exactness reference for tests and benchmarks).
LOCAL_ATTENTION = ("sdpa", "unfused")


def transformer_config(
    spec: ModelSpec, tp_size: int, dtype: torch.dtype = torch.float32, use_te: bool = False,
    recompute: str = "none",
):
    """megatron-core's TransformerConfig for ``spec`` at TP ``tp_size``.

    ``recompute="full"`` keeps only each layer's input for the backward and re-runs the layer
    (megatron's full/uniform recomputation, one layer per checkpoint): activations of long
    responses then cost layers x tokens x hidden, not the whole working set of every layer.
    """
    if recompute not in RECOMPUTE:
        raise ModelBuildError(f"recompute={recompute!r}: expected one of {list(RECOMPUTE)}")
    full = recompute == "full"
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,  # SwiGLU: silu(gate) * up
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp_size,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # The jit-fused bias/dropout/activation kernels only pay off on GPU; rope and softmax
        # fusions need TE's kernels. gradient_accumulation_fusion writes into ``main_grad``
        # buffers that only Megatron's DDP wrapper allocates, so it stays off here.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=use_te,
        apply_rope_fusion=use_te,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        recompute_granularity="full" if full else None,
        recompute_method="uniform" if full else None,
        recompute_num_layers=1 if full else None,
    )


def build_gpt_model(
    spec: ModelSpec,
    dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    vocab_padding_tp: int | None = None,
    recompute: str = "none",
    local_attention: str = "sdpa",
):
    """A megatron-core GPTModel for ``spec`` on this TP rank (TP size from ``parallel_state``).

    The vocabulary is padded to ``padded_vocab_size(spec.vocab_size, tp)``; the output layer keeps
    its vocab shard (``parallel_output=True``), see ``model_logits``. ``use_te=None`` picks the
    Transformer Engine layer spec when TE imports and CUDA is available, else the local spec;
    the two name some parameters differently (``weights.table``'s ``te`` flag).
    ``vocab_padding_tp`` pads the vocabulary as that TP size would (a one-process converter writes
    the exact shapes of a TP=N run). Built inside ``torch.device("meta")`` the model allocates
    nothing; converters materialise it a layer at a time with ``to_empty``.
    ``local_attention`` picks the local spec's core attention (``LOCAL_ATTENTION``); the TE spec
    ignores it. Neither choice has parameters, so checkpoints and weight tables are the same.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if local_attention not in LOCAL_ATTENTION:
        raise ModelBuildError(f"local_attention={local_attention!r}: expected one of {list(LOCAL_ATTENTION)}")
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    check_tp(spec, tp_size)
    if use_te is None:
        use_te = transformer_engine_available()
    elif use_te and not transformer_engine_available():
        raise ModelBuildError("use_te=True, but Transformer Engine does not import or CUDA is unavailable")
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer_spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm)
    else:
        # normalization="RMSNorm" selects torch's RMSNorm (the default would be apex/LayerNorm).
        layer_spec = get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")
        if local_attention == "sdpa":
            from megatron_lpreg.model.sdpa_attention import SDPADotProductAttention

            layer_spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    model = GPTModel(
        config=transformer_config(spec, tp_size, dtype, use_te, recompute),
        transformer_layer_spec=layer_spec,
        vocab_size=padded_vocab_size(spec.vocab_size, vocab_padding_tp or tp_size),
        max_sequence_length=spec.max_position_embeddings,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
        rope_scaling=spec.rope_scaling_factor is not None,
        rope_scaling_factor=spec.rope_scaling_factor or 8.0,
    )
    # The local spec's torch norms ignore params_dtype; cast them as megatron's Float16Module
    # does, so a bf16 model is bf16 throughout (master weights live in the optimizer).
    return model.to(dtype)


def model_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None, packed_seq_params=None,
) -> torch.Tensor:
    """Causal-LM logits of ``input_ids`` [B, S] -> [B, S, V_padded / TP], vocab-sharded.

    TP rank r holds global vocab ids [r * V_local, (r + 1) * V_local); ids >= the real vocab size
    are padding. Positions are 0..S-1 for every row (no left padding). ``attention_mask``
    [B, 1, S, S] bool (True = masked) replaces the causal mask, e.g. block-diagonal for packed rows
    (``grpo.packing``); only the local layer spec honours it (TE's attention applies its own). With
    no mask the local spec's SDPA attention runs causal without materialising one (CPU and CUDA).

    ``positions``: only these positions go through the output layer, -> [N, V_padded / TP]. Either
    flat indices into the row-major [B * S] positions (in the order wanted; what a caller should
    pass, as it needs no host sync) or a [B, S] bool mask (row-major order, one sync to find them).
    The decoder still sees every position; only the LM head, the largest matmul of a small model
    and the [B, S, V] output, shrinks to the positions read: a response's tokens and the last
    prompt position, which predicts the first response token.

    ``packed_seq_params``: megatron's THD format (``policy.packing.thd_params``, TE only):
    ``input_ids`` is then [1, T], the packed sequences end to end, and no mask is built.
    """
    from megatron_lpreg.model.sdpa_attention import needs_explicit_causal_mask

    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
    if packed_seq_params is not None:
        if attention_mask is not None or batch != 1:
            raise ValueError("packed_seq_params: input_ids must be one [1, T] THD batch, without an attention_mask")
    elif attention_mask is not None:
        attention_mask = attention_mask.to(input_ids.device)
    elif input_ids.device.type == "cuda" or not needs_explicit_causal_mask(model):
        # TE, SDPA and megatron's CUDA softmax apply the causal mask themselves (SDPA's is_causal
        # also skips the masked half of the work).
        attention_mask = None
    else:
        # Megatron's unfused softmax builds its default causal mask on the CUDA device: on CPU it
        # must be passed in explicitly.
        from megatron_lpreg.cpu_shims import causal_attention_mask

        attention_mask = causal_attention_mask(seq, device=input_ids.device)
    forward = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
    if packed_seq_params is not None:
        forward["packed_seq_params"] = packed_seq_params
    if positions is None:
        return model(**forward)

    flat = _flat_positions(positions, batch, seq, input_ids.device)
    head = model.output_layer
    if getattr(head, "sequence_parallel", False):
        raise ModelBuildError("model_logits(positions=...) does not support sequence parallelism")

    def select_rows(_module, args, kwargs):
        # The output layer gets the final-norm hidden states [S, B, H] (megatron's layout); hand
        # it the wanted rows as [N, 1, H]. Everything before it is GPTModel's own forward, so
        # embedding, RoPE, masks and tied weights are exactly the full path's.
        hidden = args[0]
        rows = hidden[flat % seq, torch.div(flat, seq, rounding_mode="floor")]
        return (rows.unsqueeze(1), *args[1:]), kwargs

    handle = head.register_forward_pre_hook(select_rows, with_kwargs=True)
    try:
        logits = model(**forward)
    finally:
        handle.remove()
    return logits.squeeze(0)  # GPTModel returns [b, s, V] = [1, N, V] for the [N, 1, H] input


def _flat_positions(positions: torch.Tensor, batch: int, seq: int, device) -> torch.Tensor:
    positions = positions.to(device)
    if positions.dtype == torch.bool:
        if positions.shape != (batch, seq):
            raise ValueError(f"positions mask {tuple(positions.shape)} != input_ids {(batch, seq)}")
        return positions.reshape(-1).nonzero().squeeze(1)
    if positions.dim() != 1 or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError("positions: flat int indices into [B * S] or a [B, S] bool mask")
    return positions.long()
