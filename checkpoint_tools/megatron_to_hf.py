"""Convert a Megatron checkpoint (ours, or one Megatron-LM / Megatron-Bridge wrote) to Hugging Face.

    python -m checkpoint_tools.megatron_to_hf --ckpt DIR --out DIR [--hf-config HF_DIR]
                                              [--max-shard-size 5GB] [--force]

Reads one group (layer) at a time at TP=1, whatever TP wrote the checkpoint: each layer is read
straight from its slice of the stacked tensors. Writes sharded safetensors + index, config.json and
the tokenizer files, which ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads.
Megatron-LM and Bridge checkpoints carry no HF config or tokenizer: ``--hf-config`` names an HF
directory to take them from (its shapes are checked against the checkpoint's); our own
checkpoints carry them in ``hf/``. Our previous layout (``model/<group>/``) is read too.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from checkpoint_tools.common import (
    DTYPES, ConversionError, cpu_world, materialise, meta_model, progress, release, run_cli,
)



def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise ConversionError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB or a byte count")
    return int(float(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m.group(2)])


def convert(ckpt_dir, out_dir, max_shard_bytes: int = 5 * 1024**3, force: bool = False,
            show_progress: bool = True, hf_config=None) -> dict:
    from megatron_lpreg import checkpointing as ckpt
    from megatron_lpreg import legacy_layout, megatron_layout
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.weights import find_param, model_params, to_hf
    from megatron_lpreg.weights.hf_files import HFShardWriter
    from megatron_lpreg.weights.hf_export import set_config_dtype

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    ckpt.check_writable(out_dir, force)  # before any work, not after it
    meta = ckpt.describe(ckpt_dir)
    hf_files = Path(hf_config) if hf_config else ckpt_dir / ckpt.HF_DIR
    if not (hf_files / "config.json").exists():
        if hf_config:
            raise ConversionError(f"--hf-config {hf_files}: no config.json")
        raise ConversionError(f"{ckpt_dir}: no {ckpt.HF_DIR}/config.json (a Megatron-LM or Bridge checkpoint?): "
                              f"pass --hf-config HF_DIR, the HF directory of the same model")
    spec = parse_hf_config(hf_files)
    legacy = meta["layout"] == "legacy"
    if legacy:
        dtype = DTYPES[meta["dtype"]]
    else:
        iter_dir = meta["iteration_dir"]
        ckpt.check_dcp_files(iter_dir)
        dtype = megatron_layout.checkpoint_dtype(iter_dir)
    name = {v: k for k, v in DTYPES.items()}.get(dtype)
    if name is None:
        raise ConversionError(f"{ckpt_dir}: weights are {dtype}, expected one of {sorted(DTYPES)}")
    with cpu_world():
        model = meta_model(spec, dtype)
        groups = ckpt.model_groups(spec.num_layers)
        if not legacy:  # every shape, from the index, before anything is written
            try:
                sharded = megatron_layout.model_sharded_state_dict(model, not megatron_layout.stacked(iter_dir))
                megatron_layout.check_shapes(iter_dir, megatron_layout.weights_only(sharded))
            except megatron_layout.LayoutError as e:
                raise ConversionError(f"{e} (with the config of {hf_files})") from None
        with ckpt.staged_directory(out_dir, overwrite=force) as tmp, \
                progress(len(groups), "megatron -> hf", show_progress) as bar:
            plan = [(n, shape, dtype) for param in model_params(spec)
                    for n, shape in zip(param.hf, param.hf_shapes)]
            writer = HFShardWriter(tmp, plan, max_shard_bytes)
            for group in groups:
                modules = ckpt.group_modules(model, group)
                materialise(modules)
                if legacy:
                    legacy_layout.load_group(model, group, ckpt_dir)
                else:
                    megatron_layout.read_group(model, group, iter_dir)
                for pname, p in ckpt.group_parameters(model, group):
                    for hf_name, tensor in to_hf(spec, find_param(spec, pname), [p.detach()]):
                        writer.add(hf_name, tensor)
                release(modules)
                bar.update(1)
            total = writer.close()
            ckpt.copy_hf_files(hf_files, tmp)
            set_config_dtype(tmp / "config.json", dtype)
    return {"architecture": spec.architecture, "num_layers": spec.num_layers, "dtype": name, "bytes": total}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m checkpoint_tools.megatron_to_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="checkpoint directory: hf_to_megatron's, a training step's, or a Megatron-LM/Bridge "
                        "one (the directory with latest_checkpointed_iteration.txt, or an iter_* directory)")
    p.add_argument("--hf-config", default=None,
                   help="HF directory to take config.json and the tokenizer from (needed for Megatron-LM/Bridge "
                        "checkpoints; default: the checkpoint's own hf/)")
    p.add_argument("--out", required=True, help="output HF directory (must not exist or be empty)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    meta = convert(args.ckpt, args.out, parse_size(args.max_shard_size), args.force,
                   show_progress=not args.no_progress, hf_config=args.hf_config)
    print(f"wrote {args.out}: {meta['architecture']}, {meta['num_layers']} layers, {meta['dtype']}, "
          f"{meta['bytes'] / 1e9:.2f} GB")


if __name__ == "__main__":
    sys.exit(run_cli(main))
