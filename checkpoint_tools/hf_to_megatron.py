"""Convert a Hugging Face checkpoint to a megatron-lpreg distributed checkpoint.

    python -m checkpoint_tools.hf_to_megatron --hf DIR --out DIR --tp N [--dtype bf16] [--force]

Reads (sharded) safetensors one layer at a time and writes Megatron-LM's checkpoint layout
(``latest_checkpointed_iteration.txt`` + ``iter_0000000/``, one torch_dist save of the GPTModel's
sharded state dict with Megatron-LM ``args``, and Bridge's ``run_config.yaml``), which Megatron-LM
(``--load OUT --finetune``), Megatron-Bridge and megatron-lpreg load at any TP size. One layer is
resident at a time: each is saved on its own and the saves are joined into one index.
``--tp`` checks that the model splits at that size and pads the vocabulary as a TP=N run does.
Config, generation config and tokenizer files are copied into the checkpoint's ``hf/`` directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from checkpoint_tools.common import (
    DTYPES, ConversionError, cpu_world, materialise, meta_model, progress, release,
    run_cli,
)

# HF tensors that are not weights of the model (buffers some exporters save)
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def check_hf_checkpoint(spec, reader) -> None:
    """Every tensor the table needs is present with the config's shape, and no tensor is unknown:
    checked from the shard headers before anything is written."""
    from megatron_lpreg.weights import model_params, param_for_hf

    shapes = reader.shapes()
    for param in model_params(spec):
        for name, shape in zip(param.hf, param.hf_shapes):
            if name not in shapes:
                raise ConversionError(
                    f"{reader.directory}: tensor {name!r} is missing (needed for {param.megatron})")
            if shapes[name] != shape:
                raise ConversionError(
                    f"{reader.directory}: tensor {name!r} in {reader.file_of(name)} has shape "
                    f"{shapes[name]}, but config.json implies {shape}")
    unknown = [n for n in shapes if param_for_hf(spec, n) is None and not n.endswith(_IGNORED_SUFFIXES)
               and not (spec.tie_word_embeddings and n == "lm_head.weight")]
    if unknown:
        raise ConversionError(
            f"{reader.directory}: {len(unknown)} tensors do not belong to a {spec.architecture} with this "
            f"config.json, e.g. {unknown[:3]} (wrong architecture or num_hidden_layers?)")


def convert(hf_dir, out_dir, tp: int, dtype: torch.dtype | None = None, force: bool = False,
            show_progress: bool = True) -> dict:
    from megatron_lpreg import checkpointing as ckpt
    from megatron_lpreg import megatron_layout
    from megatron_lpreg.model import check_tp, padded_vocab_size, parse_hf_config
    from megatron_lpreg.weights import find_param, to_megatron_shard
    from megatron_lpreg.weights.hf_files import HFCheckpoint

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    ckpt.check_writable(out_dir, force)  # before any work, not after it
    spec = parse_hf_config(hf_dir)
    check_tp(spec, tp)
    reader = HFCheckpoint(hf_dir)
    check_hf_checkpoint(spec, reader)
    dtype = dtype or spec.torch_dtype
    padded = padded_vocab_size(spec.vocab_size, tp)
    metadata = ckpt.model_metadata(spec, source=hf_dir, dtype=dtype, tp_size=tp, padded_vocab_size=padded)
    with cpu_world():
        model = meta_model(spec, dtype, vocab_padding_tp=tp)
        groups = ckpt.model_groups(spec.num_layers)
        args = megatron_layout.megatron_args(spec, tp_size=tp, dtype=dtype, padded_vocab_size=padded, iteration=0)
        with ckpt.staged_directory(out_dir, overwrite=force) as tmp, \
                progress(len(groups), "hf -> megatron", show_progress) as bar:
            ckpt.copy_hf_files(hf_dir, tmp / ckpt.HF_DIR)
            writer = megatron_layout.StreamingWriter(tmp, iteration=0, args=args)
            for group in groups:
                modules = ckpt.group_modules(model, group)
                materialise(modules)
                with torch.no_grad():
                    for name, p in ckpt.group_parameters(model, group):
                        param = find_param(spec, name)
                        to_megatron_shard(spec, param, reader, 0, 1, padded_vocab=padded, out=p)
                writer.save(model, group)
                release(modules)
                bar.update(1)
            writer.finish()
            ckpt.write_metadata(tmp, {**metadata, "layout": "megatron-lm", "iteration": 0})
    return metadata


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m checkpoint_tools.hf_to_megatron", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size the checkpoint is made for")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype (default: the checkpoint's torch_dtype)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    meta = convert(args.hf, args.out, args.tp, DTYPES[args.dtype] if args.dtype else None, args.force,
                   show_progress=not args.no_progress)
    print(f"wrote {args.out}: {meta['architecture']}, {meta['num_layers']} layers, {meta['dtype']}, "
          f"vocab {meta['vocab_size']} padded to {meta['padded_vocab_size']} for tp={meta['tp_size']}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
