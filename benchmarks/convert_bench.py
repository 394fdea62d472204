"""HF -> Megatron (TP=2) -> HF on a synthetic Qwen-shaped checkpoint, against a plain file copy.

    python benchmarks/convert_bench.py [--layers 24] [--hidden 1024] [--ffn 8192] [--keep DIR]

Writes a bf16 Qwen2 checkpoint (default ~2 GB: vocab 151,936 untied, 24 layers) in 1 GB shards,
then times, side by side in one run on the same page-cached files:
  copy      read + write of the same bytes (64 MiB chunks): the floor for any converter
  to_meg    python -m checkpoint_tools.hf_to_megatron --tp 2
  to_hf     python -m checkpoint_tools.megatron_to_hf
and checks that the round trip is bitwise. Peak memory of each converter (PSS of its process tree) is
compared with the largest group (the embedding, here) and a decoder layer, both absolute and above
a baseline process that imports the same modules and builds the meta-device model but converts
nothing. Targets: round trip <= 3x copy per direction; peak memory above baseline <= 2 largest groups.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASELINE = """
import sys
from checkpoint_tools.common import cpu_world, meta_model
from megatron_lpreg.model import parse_hf_config
from megatron_lpreg import checkpointing
import safetensors, tqdm, megatron.core.dist_checkpointing
with cpu_world():
    meta_model(parse_hf_config(sys.argv[1]), __import__("torch").bfloat16)
"""


def make_checkpoint(directory: Path, layers: int, hidden: int, ffn: int, vocab: int) -> tuple[int, int, int]:
    """Write the synthetic checkpoint; return (total bytes, embedding bytes, layer bytes)."""
    import torch
    from safetensors.torch import save_file

    heads, kv_heads, head_dim = hidden // 64, max(1, hidden // 256), 64
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.bfloat16)

    q, kv = heads * head_dim, kv_heads * head_dim
    tensors_per_layer = lambda i: {  # noqa: E731
        f"model.layers.{i}.input_layernorm.weight": t(hidden),
        f"model.layers.{i}.self_attn.q_proj.weight": t(q, hidden),
        f"model.layers.{i}.self_attn.k_proj.weight": t(kv, hidden),
        f"model.layers.{i}.self_attn.v_proj.weight": t(kv, hidden),
        f"model.layers.{i}.self_attn.q_proj.bias": t(q),
        f"model.layers.{i}.self_attn.k_proj.bias": t(kv),
        f"model.layers.{i}.self_attn.v_proj.bias": t(kv),
        f"model.layers.{i}.self_attn.o_proj.weight": t(hidden, q),
        f"model.layers.{i}.post_attention_layernorm.weight": t(hidden),
        f"model.layers.{i}.mlp.gate_proj.weight": t(ffn, hidden),
        f"model.layers.{i}.mlp.up_proj.weight": t(ffn, hidden),
        f"model.layers.{i}.mlp.down_proj.weight": t(hidden, ffn),
    }
    groups = [{"model.embed_tokens.weight": t(vocab, hidden)}]
    groups += [tensors_per_layer(i) for i in range(layers)]
    groups.append({"model.norm.weight": t(hidden), "lm_head.weight": t(vocab, hidden)})
    nbytes = lambda d: sum(x.numel() * x.element_size() for x in d.values())  # noqa: E731
    sizes = [nbytes(d) for d in groups]
    shard, shard_bytes, shards = {}, 0, []
    for d in groups:
        if shard and shard_bytes + nbytes(d) > 1024**3:
            shards.append(shard)
            shard, shard_bytes = {}, 0
        shard.update(d)
        shard_bytes += nbytes(d)
    shards.append(shard)
    weight_map = {}
    for k, s in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, str(directory / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in s})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}))
    return sum(sizes), sizes[0], sizes[1]


def plain_copy(src: Path, dst: Path, fsync: bool) -> float:
    start = time.perf_counter()
    dst.mkdir()
    for f in sorted(src.iterdir()):
        with open(f, "rb") as fin, open(dst / f.name, "wb") as fout:
            while chunk := fin.read(64 * 1024**2):
                fout.write(chunk)
            if fsync:
                fout.flush()
                os.fsync(fout.fileno())
    return time.perf_counter() - start


def compare(a_dir: str, b_dir: str) -> bool:
    import torch

    from megatron_lpreg.weights.hf_files import HFCheckpoint

    a, b = HFCheckpoint(a_dir), HFCheckpoint(b_dir)
    return sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a)


def child(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode:
        raise SystemExit(f"{args} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def run(args: list[str]) -> tuple[float, int]:
    """Wall time and peak memory (bytes) of one subprocess and its children.

    Memory is the process tree's summed PSS, sampled every 50 ms: dist_checkpointing forks writer
    processes, whose RSS counts the pages they share with the parent again (ru_maxrss would
    report a fork's inherited peak, not memory in use).
    """
    import psutil

    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    peak = 0
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
            peak = max(peak, total)
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{args} failed:\n{err.read().decode()[-3000:]}")
    return elapsed, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--keep", default=None, help="work directory to keep (default: a temp dir, removed)")
    p.add_argument("--_make", help=argparse.SUPPRESS)
    p.add_argument("--_compare", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    # Tensors are made and compared in child processes: a child inherits its parent's peak RSS
    # through fork, so the parent stays small for the converters' peaks to be their own.
    if args._make:
        print(json.dumps(make_checkpoint(Path(args._make), args.layers, args.hidden, args.ffn, args.vocab)))
        return
    if args._compare:
        print(json.dumps(compare(*args._compare)))
        return
    script = [str(Path(__file__).resolve()), "--layers", str(args.layers), "--hidden", str(args.hidden),
              "--ffn", str(args.ffn), "--vocab", str(args.vocab)]

    work = Path(args.keep or tempfile.mkdtemp(prefix="convert_bench_"))
    try:
        hf = work / "hf"
        total, emb, layer = json.loads(child([*script, "--_make", str(hf)]))
        print(f"synthetic Qwen2: {total / 1e9:.2f} GB bf16, embedding {emb / 1e6:.0f} MB, "
              f"decoder layer {layer / 1e6:.0f} MB")
        copy_s = plain_copy(hf, work / "copy", fsync=False)
        shutil.rmtree(work / "copy")
        sync_s = plain_copy(hf, work / "copy", fsync=True)
        shutil.rmtree(work / "copy")
        base_s, base_rss = run(["-c", BASELINE, str(hf)])
        meg_s, meg_rss = run(["-m", "checkpoint_tools.hf_to_megatron", "--hf", str(hf), "--out",
                              str(work / "meg"), "--tp", "2", "--no-progress"])
        back_s, back_rss = run(["-m", "checkpoint_tools.megatron_to_hf", "--ckpt", str(work / "meg"),
                                "--out", str(work / "back"), "--no-progress"])
        bitwise = json.loads(child([*script, "--_compare", str(hf), str(work / "back")]))
        largest = max(emb, layer)
        print(f"plain copy           {copy_s:7.2f} s")
        print(f"copy + fsync         {sync_s:7.2f} s   (dist_checkpointing and our writer fsync)")
        print(f"baseline (imports)   {base_s:7.2f} s   peak PSS {base_rss / 1e9:.2f} GB")
        print(f"hf -> megatron tp=2  {meg_s:7.2f} s   peak PSS {meg_rss / 1e9:.2f} GB")
        print(f"megatron -> hf       {back_s:7.2f} s   peak PSS {back_rss / 1e9:.2f} GB")
        print(f"round trip bitwise: {bitwise}")
        print("ratios:")
        print(f"  hf->megatron / copy = {meg_s / copy_s:.2f}   megatron->hf / copy = {back_s / copy_s:.2f}"
              f"   round trip / (2 x copy) = {(meg_s + back_s) / (2 * copy_s):.2f}   (target <= 3)")
        print(f"  against copy + fsync: {meg_s / sync_s:.2f}, {back_s / sync_s:.2f}; without the fixed start-up "
              f"(baseline {base_s:.1f} s): {(meg_s - base_s) / sync_s:.2f}, {(back_s - base_s) / sync_s:.2f}")
        for label, rss in (("hf->megatron", meg_rss), ("megatron->hf", back_rss)):
            print(f"  {label}: peak PSS / largest group = {rss / largest:.2f};  (peak - baseline) / "
                  f"largest group = {(rss - base_rss) / largest:.2f}  (target <= 2)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
