"""Training-checkpoint save time per GB: the previous layout against Megatron-LM's, in one run.

    python benchmarks/checkpoint_save_bench.py [--model HF_DIR] [--tp 1] [--dtype bf16]

Builds the policy model (default: SmolLM2-135M's shape, random weights: 30 layers, hidden 576,
vocab 49,152, tied) and its AdamW optimiser after one step, then saves the model and optimiser part
of a training checkpoint both ways, each into a fresh directory:
  before   the previous layout: one dist_checkpointing save per group (embedding, each layer,
           final) for the model and another per group for the optimiser (2 x (layers + 2) saves)
  after    ``save_training_checkpoint``: one save of the model in Megatron-LM's layout, one of the
           optimiser state beside it
and, as the floor, ``floor``: the same tensors (this rank's model shards and optimiser state) written
with one ``torch.save`` and fsync'd. Prints seconds, GB written, seconds per GB and the ratios. Run with ``--tp 2`` to time it on
two gloo ranks (``torchrun`` is not needed: ranks are spawned here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOLLM2_135M = {  # config.json of HuggingFaceTB/SmolLM2-135M (shape only)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _before(model, optimizer, directory: Path) -> None:
    """What save_training_checkpoint did before format 2 (its model and optimiser part)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_lpreg import checkpointing, legacy_layout

    for group in checkpointing.model_groups(len(model.decoder.layers)):
        legacy_layout.save_group(model, group, directory)
        where = directory / "optim" / group
        if dist.get_rank() == 0:
            where.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(optimizer.sharded_state_dict(legacy_layout.group_sharded_state_dict(model, group)),
                                str(where))


def _floor(model, optimizer, directory: Path) -> None:
    import os

    import torch
    import torch.distributed as dist

    tensors = {name: p.detach() for name, p in model.named_parameters()}
    for name in tensors.copy():
        tensors.update({f"{kind}/{name}": t for kind, t in optimizer.param_state(name).items()})
    directory.mkdir(parents=True)
    with open(directory / f"rank_{dist.get_rank()}.pt", "wb") as f:
        torch.save(tensors, f)
        f.flush()
        os.fsync(f.fileno())


def _after(model, optimizer, directory: Path, spec, tp: int, dtype) -> None:
    from megatron_lpreg import checkpointing
    from megatron_lpreg.megatron_layout import megatron_args
    from megatron_lpreg.model import padded_vocab_size
    from megatron_lpreg.policy.training_checkpoint import save_training_checkpoint

    padded = padded_vocab_size(spec.vocab_size, tp)
    meta = checkpointing.model_metadata(spec, source=directory, dtype=dtype, tp_size=tp, padded_vocab_size=padded)
    args = megatron_args(spec, tp_size=tp, dtype=dtype, padded_vocab_size=padded, iteration=1)
    save_training_checkpoint(directory, model=model, optimizer=optimizer, metadata=meta,
                             trainer_state={"step": 1, "world_size": tp}, megatron_args=args)


def _body(ctx, model_dir: str, dtype_name: str, out: str):
    import torch
    import torch.distributed as dist

    from megatron_lpreg.loss import vocab_parallel_logprobs
    from megatron_lpreg.model import build_gpt_model, model_logits, parse_hf_config
    from megatron_lpreg.policy.optimizer import PolicyOptimizer

    spec = parse_hf_config(model_dir)
    dtype = getattr(torch, dtype_name)
    model = build_gpt_model(spec, dtype, use_te=False)
    optimizer = PolicyOptimizer(model, lr=1e-6, dp_group=ctx.dp_group, tp_group=ctx.tp_group)
    ids = torch.randint(0, spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    logits = model_logits(model, ids)[:, :-1]
    (-vocab_parallel_logprobs(logits, ids[:, 1:], group=ctx.tp_group, vocab_size=spec.vocab_size).mean()).backward()
    optimizer.step()
    times = {}
    for name, save in (("before", lambda d: _before(model, optimizer, d)),
                       ("after", lambda d: _after(model, optimizer, d, spec, ctx.tp_size, dtype)),
                       ("floor", lambda d: _floor(model, optimizer, d))):
        directory = Path(out) / name
        dist.barrier()
        start = time.perf_counter()
        save(directory)
        dist.barrier()
        times[name] = time.perf_counter() - start
    return times if ctx.rank == 0 else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model directory (default: SmolLM2-135M's shape, random weights)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    from tests.distributed import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(tmp) / "model"
            model_dir.mkdir()
            (model_dir / "config.json").write_text(json.dumps(SMOLLM2_135M))
        out = Path(tmp) / "out"
        times = run_distributed(_body, args.tp, args.tp, args=(str(model_dir), args.dtype, str(out)),
                                timeout_s=1800)[0]
        sizes = {name: _bytes(out / name) for name in times}
        shutil.rmtree(out)
    print(f"model {args.model or 'SmolLM2-135M shape'}, tp={args.tp}, {args.dtype}")
    print(f"{'':8} {'seconds':>8} {'GB':>7} {'s/GB':>7}")
    for name in times:
        print(f"{name:8} {times[name]:8.2f} {sizes[name] / 1e9:7.3f} {times[name] / (sizes[name] / 1e9):7.2f}")
    print(f"after / floor: {(times['after'] / sizes['after']) / (times['floor'] / sizes['floor']):.2f}x the floor's "
          f"time per GB")
    print(f"after / before: {times['after'] / times['before']:.3f} of the time "
          f"({times['before'] / times['after']:.1f}x faster), "
          f"{(times['after'] / sizes['after']) / (times['before'] / sizes['before']):.3f} of the time per GB")


if __name__ == "__main__":
    main()
