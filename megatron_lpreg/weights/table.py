"""THE mapping between HF checkpoint tensors and megatron-core GPTModel parameters.

One table (``RULES``) states, for every Megatron parameter, the HF tensors it is made of, their
shapes in terms of the ModelSpec, and how it is split across TP ranks (``tp_rules.Split``). The
checkpoint converters, the refit into vLLM and the transformers rollout engine all go through the
functions below, so they cannot disagree about names, fusion order or padding.

Two Megatron naming schemes exist for the same model: the local layer spec (separate
``input_layernorm`` / ``pre_mlp_layernorm`` modules) and the Transformer Engine spec, where those
norms are fused into the following linear (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``). ``te=True`` selects the latter. ``_extra_state`` entries (fp8 /
TE metadata, on every linear under both specs) are not weights: ``is_weight`` filters them.

All functions are pure: no collectives, no files. HF tensors come from any Mapping (a lazy one,
e.g. over safetensors files, is read only for the names a parameter needs).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from megatron_lpreg.model.hf_config import ModelSpec, check_tp, padded_vocab_size
from megatron_lpreg.weights import tp_rules
from megatron_lpreg.weights.tp_rules import Split


class WeightTableError(ValueError):
    """A tensor is missing, unknown, or has a shape the model config does not imply."""


@dataclass(frozen=True)
class HF:
    """One HF tensor of a rule: name pattern ({i} = layer) and shape as ModelSpec attributes."""

    name: str
    dims: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    megatron: str  # name pattern under the local layer spec ({i} = layer)
    hf: tuple[HF, ...]  # in the order the split rule takes them (q, k, v / gate, up)
    split: Split
    when: str | None = None  # ModelSpec flag the parameter exists under; "!flag": exists unless
    te_name: str | None = None  # name under the Transformer Engine spec, when it differs


def _hf(name: str, *dims: str) -> HF:
    return HF(name, dims)


_M = "decoder.layers.{i}."
_H = "model.layers.{i}."

RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", (_hf("model.embed_tokens.weight", "vocab_size", "hidden_size"),),
         Split.VOCAB),
    Rule(_M + "input_layernorm.weight", (_hf(_H + "input_layernorm.weight", "hidden_size"),),
         Split.REPLICATED, te_name=_M + "self_attention.linear_qkv.layer_norm_weight"),
    Rule(_M + "self_attention.linear_qkv.weight",
         (_hf(_H + "self_attn.q_proj.weight", "q_size", "hidden_size"),
          _hf(_H + "self_attn.k_proj.weight", "kv_size", "hidden_size"),
          _hf(_H + "self_attn.v_proj.weight", "kv_size", "hidden_size")),
         Split.QKV),
    Rule(_M + "self_attention.linear_qkv.bias",
         (_hf(_H + "self_attn.q_proj.bias", "q_size"),
          _hf(_H + "self_attn.k_proj.bias", "kv_size"),
          _hf(_H + "self_attn.v_proj.bias", "kv_size")),
         Split.QKV, when="qkv_bias"),
    # Qwen3's q/k norms act on one head (head_dim wide), identically on every rank.
    Rule(_M + "self_attention.q_layernorm.weight", (_hf(_H + "self_attn.q_norm.weight", "head_dim"),),
         Split.REPLICATED, when="qk_norm"),
    Rule(_M + "self_attention.k_layernorm.weight", (_hf(_H + "self_attn.k_norm.weight", "head_dim"),),
         Split.REPLICATED, when="qk_norm"),
    Rule(_M + "self_attention.linear_proj.weight",
         (_hf(_H + "self_attn.o_proj.weight", "hidden_size", "q_size"),), Split.ROW),
    Rule(_M + "pre_mlp_layernorm.weight", (_hf(_H + "post_attention_layernorm.weight", "hidden_size"),),
         Split.REPLICATED, te_name=_M + "mlp.linear_fc1.layer_norm_weight"),
    Rule(_M + "mlp.linear_fc1.weight",
         (_hf(_H + "mlp.gate_proj.weight", "ffn_hidden_size", "hidden_size"),
          _hf(_H + "mlp.up_proj.weight", "ffn_hidden_size", "hidden_size")),
         Split.GATE_UP),
    Rule(_M + "mlp.linear_fc2.weight", (_hf(_H + "mlp.down_proj.weight", "hidden_size", "ffn_hidden_size"),),
         Split.ROW),
    Rule("decoder.final_layernorm.weight", (_hf("model.norm.weight", "hidden_size"),), Split.REPLICATED),
    # Tied models have no lm_head in HF and no output_layer weight in Megatron (it reuses the
    # embedding); an lm_head.weight a tied checkpoint happens to contain is ignored.
    Rule("output_layer.weight", (_hf("lm_head.weight", "vocab_size", "hidden_size"),), Split.VOCAB,
         when="!tie_word_embeddings"),
)


@dataclass(frozen=True)
class Param:
    """A rule bound to a model (and a layer): one Megatron parameter and its HF tensors."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    split: Split
    layer: int | None  # None for embedding, final norm, output layer


def _applies(rule: Rule, spec: ModelSpec) -> bool:
    if rule.when is None:
        return True
    negate = rule.when.startswith("!")
    return bool(getattr(spec, rule.when.lstrip("!"))) != negate


def _bind(rule: Rule, spec: ModelSpec, layer: int | None, te: bool) -> Param:
    name = rule.te_name if te and rule.te_name else rule.megatron
    fmt = {} if layer is None else {"i": layer}
    return Param(
        megatron=name.format(**fmt),
        hf=tuple(h.name.format(**fmt) for h in rule.hf),
        hf_shapes=tuple(tuple(getattr(spec, d) for d in h.dims) for h in rule.hf),
        split=rule.split,
        layer=layer,
    )


def _is_layer_rule(rule: Rule) -> bool:
    return "{i}" in rule.megatron


def layer_params(spec: ModelSpec, layer: int, te: bool = False) -> list[Param]:
    """The parameters of decoder layer ``layer``: the unit a converter streams."""
    if not 0 <= layer < spec.num_layers:
        raise WeightTableError(f"layer {layer} out of range: the model has {spec.num_layers} layers")
    return [_bind(r, spec, layer, te) for r in RULES if _is_layer_rule(r) and _applies(r, spec)]


@functools.lru_cache(maxsize=16)
def model_params(spec: ModelSpec, te: bool = False) -> tuple[Param, ...]:
    """Every parameter, in model order: embedding, layers 0..L-1, final norm, output layer."""
    # Non-layer rules listed before the layer rules in RULES come before the layers.
    first_layer_rule = next(n for n, r in enumerate(RULES) if _is_layer_rule(r))
    outer = [(n, r) for n, r in enumerate(RULES) if not _is_layer_rule(r) and _applies(r, spec)]
    before = [_bind(r, spec, None, te) for n, r in outer if n < first_layer_rule]
    after = [_bind(r, spec, None, te) for n, r in outer if n > first_layer_rule]
    layers = [p for i in range(spec.num_layers) for p in layer_params(spec, i, te)]
    return tuple(before + layers + after)


@functools.lru_cache(maxsize=16)
def _by_megatron(spec: ModelSpec, te: bool) -> dict[str, Param]:
    return {p.megatron: p for p in model_params(spec, te)}


@functools.lru_cache(maxsize=16)
def _by_hf(spec: ModelSpec, te: bool) -> dict[str, Param]:
    return {name: p for p in model_params(spec, te) for name in p.hf}


def is_weight(megatron_name: str) -> bool:
    """False for state-dict entries that are not weights: ``*._extra_state`` (fp8/TE metadata,
    present on every linear even with the local spec)."""
    return not megatron_name.endswith("_extra_state")


def find_param(spec: ModelSpec, megatron_name: str, te: bool = False) -> Param:
    try:
        return _by_megatron(spec, te)[megatron_name]
    except KeyError:
        raise WeightTableError(
            f"unknown Megatron parameter {megatron_name!r} for a {spec.family} model"
            f" ({'TE' if te else 'local'} layer spec)"
        ) from None


def param_for_hf(spec: ModelSpec, hf_name: str, te: bool = False) -> Param | None:
    """The parameter HF tensor ``hf_name`` feeds, or None if it is not a weight of the model
    (e.g. lm_head.weight of a tied model, rotary inv_freq buffers in old checkpoints)."""
    return _by_hf(spec, te).get(hf_name)


def megatron_param_names(spec: ModelSpec, te: bool = False) -> list[str]:
    return [p.megatron for p in model_params(spec, te)]


def hf_param_names(spec: ModelSpec) -> list[str]:
    return [name for p in model_params(spec) for name in p.hf]


def hf_names_for(spec: ModelSpec, megatron_name: str, te: bool = False) -> tuple[str, ...]:
    return find_param(spec, megatron_name, te).hf


def megatron_shard_shape(spec: ModelSpec, param: Param, tp_size: int) -> tuple[int, ...]:
    """Shape of one TP rank's shard of ``param`` (padding included for vocab parameters)."""
    first = param.hf_shapes[0]
    if param.split is Split.REPLICATED:
        return first
    if param.split is Split.ROW:
        return (first[0], first[1] // tp_size) + first[2:]
    if param.split is Split.VOCAB:
        return (padded_vocab_size(spec.vocab_size, tp_size) // tp_size,) + first[1:]
    # QKV and GATE_UP: the HF tensors are stacked along dim 0, then split in tp equal parts.
    return (sum(s[0] for s in param.hf_shapes) // tp_size,) + first[1:]


def to_megatron_shard(
    spec: ModelSpec,
    param: Param,
    hf_tensors: Mapping[str, torch.Tensor],
    tp_rank: int,
    tp_size: int,
    padded_vocab: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of ``param`` from the full HF tensors it is made of.

    The result may share memory with the input for replicated parameters (and at tp=1).
    ``padded_vocab`` overrides Megatron's padding for ``tp_size`` (a multiple of it). With ``out``
    (e.g. the parameter itself) the shard is written there, casting to its dtype, and returned.
    """
    check_tp(spec, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise WeightTableError(f"tp_rank={tp_rank} out of range for tp_size={tp_size}")
    full = []
    for name, shape in zip(param.hf, param.hf_shapes):
        try:
            tensor = hf_tensors[name]
        except KeyError:
            raise WeightTableError(
                f"HF tensor {name!r} (needed for Megatron {param.megatron!r}) is missing"
            ) from None
        if tuple(tensor.shape) != shape:
            raise WeightTableError(
                f"HF tensor {name!r} has shape {tuple(tensor.shape)}, but the config implies {shape}"
            )
        full.append(tensor)
    split = param.split
    if split is Split.REPLICATED:
        return _into(param, tp_rules.shard_replicated(full[0]), out)
    if split is Split.ROW:
        return _into(param, tp_rules.shard_row(full[0], tp_rank, tp_size), out)
    if split is Split.VOCAB:
        padded = padded_vocab or padded_vocab_size(spec.vocab_size, tp_size)
        if padded < spec.vocab_size or padded % tp_size:
            raise WeightTableError(f"padded vocab {padded} does not fit vocab {spec.vocab_size} at tp={tp_size}")
        if out is not None:
            _check_out(param, out, (padded // tp_size,) + full[0].shape[1:])
            return tp_rules.shard_vocab_into(out, full[0], tp_rank)
        return tp_rules.shard_vocab(full[0], tp_rank, tp_size, padded)
    if split is Split.QKV:
        shard = tp_rules.shard_qkv(*full, tp_rank, tp_size, spec.num_kv_heads)
    else:
        shard = tp_rules.shard_gate_up(*full, tp_rank, tp_size)
    return _into(param, shard, out)


def _check_out(param: Param, out: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(out.shape) != tuple(shape):
        raise WeightTableError(f"Megatron {param.megatron!r}: destination has shape {tuple(out.shape)}, "
                               f"the shard has {tuple(shape)}")


def _into(param: Param, shard: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return shard
    _check_out(param, out, tuple(shard.shape))
    return out.copy_(shard)


def to_hf(spec: ModelSpec, param: Param, shards: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The full HF tensors of ``param`` from its shards on all TP ranks (ordered by rank)."""
    tp_size = len(shards)
    if tp_size < 1:
        raise WeightTableError(f"no shards given for Megatron {param.megatron!r}")
    check_tp(spec, tp_size)
    expected = megatron_shard_shape(spec, param, tp_size)
    for rank, shard in enumerate(shards):
        if tuple(shard.shape) != expected:
            raise WeightTableError(
                f"Megatron {param.megatron!r} shard of TP rank {rank}/{tp_size} has shape "
                f"{tuple(shard.shape)}, but the config implies {expected}"
            )
    split = param.split
    if split is Split.REPLICATED:
        tensors = (tp_rules.merge_replicated(shards),)
    elif split is Split.ROW:
        tensors = (tp_rules.merge_row(shards),)
    elif split is Split.VOCAB:
        tensors = (tp_rules.merge_vocab(shards, spec.vocab_size),)
    elif split is Split.QKV:
        tensors = tp_rules.merge_qkv(shards, spec.num_attention_heads, spec.num_kv_heads, spec.head_dim)
    else:
        tensors = tp_rules.merge_gate_up(shards)
    return list(zip(param.hf, tensors))


def place_shard(spec: ModelSpec, param: Param, shard: torch.Tensor, full: Sequence[torch.Tensor], tp_rank: int,
                tp_size: int) -> None:
    """Write TP rank ``tp_rank``'s shard of ``param`` into its full HF tensors ``full`` (in the order of
    ``param.hf``), in place: what ``to_hf`` builds once every rank has placed its shard. A replicated
    parameter is written by every caller; the shared-memory refit lets only one rank do it."""
    expected = megatron_shard_shape(spec, param, tp_size)
    if tuple(shard.shape) != expected:
        raise WeightTableError(f"Megatron {param.megatron!r} shard of TP rank {tp_rank}/{tp_size} has shape "
                               f"{tuple(shard.shape)}, but the config implies {expected}")
    for name, shape, tensor in zip(param.hf, param.hf_shapes, full):
        if tuple(tensor.shape) != shape:
            raise WeightTableError(f"HF tensor {name!r} has shape {tuple(tensor.shape)}, but the config implies {shape}")
    split = param.split
    if split is Split.REPLICATED:
        tp_rules.place_replicated(shard, *full)
    elif split is Split.ROW:
        tp_rules.place_row(shard, *full, tp_rank, tp_size)
    elif split is Split.VOCAB:
        tp_rules.place_vocab(shard, *full, tp_rank)
    elif split is Split.QKV:
        tp_rules.place_qkv(shard, *full, tp_rank, tp_size, spec.num_kv_heads)
    else:
        tp_rules.place_gate_up(shard, *full, tp_rank, tp_size)


def hf_to_megatron_shard(
    spec: ModelSpec,
    hf_tensors: Mapping[str, torch.Tensor],
    tp_rank: int,
    tp_size: int,
    te: bool = False,
    params: Iterable[Param] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Megatron name, this rank's shard) for every parameter, or for ``params`` only (e.g.
    ``layer_params(spec, i)`` to stream one layer at a time)."""
    for param in model_params(spec, te) if params is None else params:
        yield param.megatron, to_megatron_shard(spec, param, hf_tensors, tp_rank, tp_size)


def megatron_to_hf(
    spec: ModelSpec, megatron_name: str, shards: list[torch.Tensor], te: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """Full HF (name, tensor) pairs from one Megatron parameter's shards, one per TP rank."""
    return to_hf(spec, find_param(spec, megatron_name, te), shards)

