"""Megatron-LM's checkpoint layout both ways, checked with megatron-core alone on the other side.

- hf_to_megatron's output (TP=1) loads with plain ``dist_checkpointing.load`` into a GPTModel built
  the way Megatron-LM builds one from the checkpoint's own ``args`` (at TP=2), every tensor equal
  to the HF source;
- a checkpoint saved by plain megatron-core in Megatron-LM's layout (TP=2: ``iter_0000007`` +
  tracker, no HF files) converts to HF bitwise with ``--hf-config`` and loads as ``model.load`` at
  TP=1, and so do one with a key per layer (megatron's non-homogeneous option), one of our previous
  layout and a training checkpoint's model part;
- bad inputs (no --hf-config, a config of another model size) are one-line errors.
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import torch

from tests.checkpoint_tools.test_convert_cli import run_tool, save_hf
from tests.distributed import run_distributed
from tests.model.tiny_models import hf_state_dict, load_safetensors_dir, tiny_hf_model

FAMILY = "qwen2"  # QKV bias, untied output layer, GQA, a padded vocabulary


def megatron_lm_model(args: Namespace):
    """A GPTModel as Megatron-LM's ``gpt_builder`` makes it from ``args`` (local layer spec):
    nothing of megatron-lpreg's model code is used."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu, activation_func=F.silu, add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias, qk_layernorm=args.qk_layernorm,
        tensor_model_parallel_size=args.tensor_model_parallel_size, params_dtype=args.params_dtype,
        use_cpu_initialization=True, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False)
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm,
                                                                      normalization=args.normalization),
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        parallel_output=True, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_base=int(args.rotary_base),
        rotary_percent=args.rotary_percent)


def _full_hf(ctx, spec, model) -> dict:
    """The model's weights as full HF tensors (TP shards gathered)."""
    import torch.distributed as dist

    from megatron_lpreg.weights import find_param, to_hf

    out = {}
    for name, p in model.named_parameters():
        shards = [torch.empty_like(p) for _ in range(ctx.tp_size)]
        dist.all_gather(shards, p.detach().contiguous(), group=ctx.tp_group)
        out.update(to_hf(spec, find_param(spec, name), shards))
    return out


def _plain_load(ctx, hf_dir: str, ckpt: str):
    from megatron.core import dist_checkpointing

    from megatron_lpreg.model import parse_hf_config

    iter_dir = Path(ckpt) / f"iter_{int((Path(ckpt) / 'latest_checkpointed_iteration.txt').read_text()):07d}"
    common = dist_checkpointing.load_common_state_dict(str(iter_dir))
    saved = common["args"]
    multiple = saved.make_vocab_size_divisible_by * ctx.tp_size  # Megatron-LM pads for its own TP
    args = Namespace(**{**vars(saved), "tensor_model_parallel_size": ctx.tp_size,
                        "padded_vocab_size": -(-saved.vocab_size // multiple) * multiple})
    model = megatron_lm_model(args)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(iter_dir))
    model.load_state_dict(loaded["model"], strict=False)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    full = _full_hf(ctx, parse_hf_config(hf_dir), model)
    return full if ctx.rank == 0 else None


def test_converted_checkpoint_loads_with_plain_megatron_core_at_tp2(tmp_path):
    hf = save_hf(FAMILY, tmp_path / "hf")
    ckpt = tmp_path / "megatron"
    run_tool("hf_to_megatron", "--hf", str(hf), "--out", str(ckpt), "--tp", "1")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert (ckpt / "iter_0000000" / "run_config.yaml").is_file()
    got = run_distributed(_plain_load, 2, 2, args=(str(hf), str(ckpt)))[0]
    original = hf_state_dict(tiny_hf_model(FAMILY, seed=0))
    assert sorted(got) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(got[name], tensor), name


def _plain_save(ctx, hf_dir: str, root: str):
    """Megatron-LM's save of a model filled from HF, at TP=2; and our previous layout of it."""
    from megatron.core import dist_checkpointing

    from megatron_lpreg import legacy_layout
    from megatron_lpreg.megatron_layout import megatron_args
    from megatron_lpreg.model import padded_vocab_size, parse_hf_config
    from megatron_lpreg.weights import load_hf_weights

    spec = parse_hf_config(hf_dir)
    args = megatron_args(spec, tp_size=2, dtype=torch.float32, padded_vocab_size=padded_vocab_size(spec.vocab_size, 2),
                         iteration=7)
    model = megatron_lm_model(args)
    load_hf_weights(model, spec, hf_dir, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
    iter_dir = Path(root) / "mlm" / "iter_0000007"
    if ctx.rank == 0:
        iter_dir.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "checkpoint_version": 3.0, "iteration": 7,
                             "args": args}, str(iter_dir))
    if ctx.rank == 0:
        (iter_dir.parent / "latest_checkpointed_iteration.txt").write_text("7")
    # megatron's other key scheme: a key per layer (non-homogeneous layers), no tracker
    per_layer = Path(root) / "per_layer" / "iter_0000007"
    if ctx.rank == 0:
        per_layer.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(metadata={"non_homogeneous_layers": True}),
                             "checkpoint_version": 3.0, "iteration": 7, "args": args}, str(per_layer))
    legacy_layout.save_model(model, Path(root) / "legacy", {"dtype": "fp32", "vocab_size": spec.vocab_size,
                                                             "num_layers": spec.num_layers})
    # a training checkpoint's model part is the same layout, its optimiser beside it
    from megatron_lpreg import checkpointing
    from megatron_lpreg.policy.optimizer import PolicyOptimizer
    from megatron_lpreg.policy.training_checkpoint import save_training_checkpoint

    meta = checkpointing.model_metadata(spec, source=hf_dir, dtype=torch.float32, tp_size=2,
                                        padded_vocab_size=args.padded_vocab_size)
    optimizer = PolicyOptimizer(model, lr=1e-3, dp_group=ctx.dp_group, tp_group=ctx.tp_group)
    save_training_checkpoint(Path(root) / "train" / "step_000003", model=model, optimizer=optimizer, metadata=meta,
                             trainer_state={"step": 3, "world_size": 2}, megatron_args=args)


def _error_line(stderr: str) -> str:
    """The converter's one error line (library warnings aside), and no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def _load_model(ctx, hf_dir: str, dirs: list[str]):
    """What ``model.load`` does with each checkpoint (here at TP=1): the weights as HF tensors."""
    from megatron_lpreg import checkpointing
    from megatron_lpreg.model import build_gpt_model, parse_hf_config

    spec = parse_hf_config(hf_dir)
    out = {}
    for directory in dirs:
        model = build_gpt_model(spec, torch.float32, use_te=False)
        checkpointing.load_model(model, directory, vocab_size=spec.vocab_size)
        out[directory] = _full_hf(ctx, spec, model)
    return out


def test_megatron_lm_and_previous_layout_checkpoints_convert_to_hf_bitwise(tmp_path):
    hf = save_hf(FAMILY, tmp_path / "hf")
    run_distributed(_plain_save, 2, 2, args=(str(hf), str(tmp_path)))
    assert not (tmp_path / "mlm" / "hf").exists()
    original = load_safetensors_dir(hf)

    # model.load (a training run's starting point) at TP=1 from the TP=2 saves
    train = tmp_path / "train" / "step_000003"
    assert (train / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (train / "iter_0000003" / "run_config.yaml").is_file() and (train / "optim" / ".metadata").is_file()
    dirs = [str(tmp_path / "mlm"), str(tmp_path / "mlm" / "iter_0000007"), str(tmp_path / "legacy"), str(train),
            str(tmp_path / "per_layer" / "iter_0000007")]
    for directory, weights in run_distributed(_load_model, 1, 1, args=(str(hf), dirs))[0].items():
        assert sorted(weights) == sorted(original), directory
        for name, tensor in original.items():
            assert torch.equal(weights[name], tensor), (directory, name)

    proc = run_tool("megatron_to_hf", "--ckpt", str(tmp_path / "mlm"), "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "--hf-config" in _error_line(proc.stderr), proc.stderr

    run_tool("megatron_to_hf", "--ckpt", str(tmp_path / "mlm"), "--out", str(tmp_path / "back"), "--hf-config", str(hf))
    run_tool("megatron_to_hf", "--ckpt", str(tmp_path / "legacy"), "--out", str(tmp_path / "back_legacy"),
             "--hf-config", str(hf))
    run_tool("megatron_to_hf", "--ckpt", str(tmp_path / "per_layer" / "iter_0000007"), "--out",
             str(tmp_path / "back_per_layer"), "--hf-config", str(hf))
    for out in ("back", "back_legacy", "back_per_layer"):
        converted = load_safetensors_dir(tmp_path / out)
        assert sorted(converted) == sorted(original), out
        for name, tensor in original.items():
            assert torch.equal(converted[name], tensor), (out, name)
    assert (tmp_path / "back" / "config.json").is_file()

    # an HF config of another model size: one line naming the tensor and both shapes
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((hf / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    proc = run_tool("megatron_to_hf", "--ckpt", str(tmp_path / "mlm"), "--out", str(tmp_path / "y"),
                    "--hf-config", str(other), check=False)
    line = _error_line(proc.stderr)
    assert proc.returncode == 2 and "linear_fc" in line and "shape" in line, proc.stderr
