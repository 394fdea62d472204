"""The converters run the way a user runs them: HF -> Megatron (TP=2) -> HF is bitwise identical.

Each family goes through both CLIs in subprocesses; one input is a sharded HF checkpoint with an
index, one output is written in several shards, and one family converts to bf16 and back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.model.tiny_models import FAMILIES, load_safetensors_dir, tiny_hf_model

REPO = Path(__file__).resolve().parents[2]


def run_tool(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", f"checkpoint_tools.{tool}", *args, "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} {args} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def save_hf(family: str, directory: Path, **kwargs) -> Path:
    model = tiny_hf_model(family, seed=FAMILIES.index(family))
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return directory


CASES = {
    # family: (save_pretrained kwargs, hf_to_megatron extra args, megatron_to_hf extra args)
    "qwen2": ({"max_shard_size": "40KB"}, [], ["--max-shard-size", "30KB"]),
    "qwen3": ({}, ["--dtype", "bf16"], []),
    "llama": ({}, [], []),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_megatron_hf_round_trip_is_bitwise(tmp_path, family):
    save_kwargs, to_megatron_args, to_hf_args = CASES[family]
    hf = save_hf(family, tmp_path / "hf", **save_kwargs)
    ckpt, back = tmp_path / "megatron", tmp_path / "hf_back"
    run_tool("hf_to_megatron", "--hf", str(hf), "--out", str(ckpt), "--tp", "2", *to_megatron_args)
    meta = json.loads((ckpt / "lpreg_checkpoint.json").read_text())
    assert meta["tp_size"] == 2 and meta["padded_vocab_size"] == 256 and meta["vocab_size"] == 101
    assert (ckpt / "hf" / "tokenizer_config.json").exists()
    run_tool("megatron_to_hf", "--ckpt", str(ckpt), "--out", str(back), *to_hf_args)

    original, converted = load_safetensors_dir(hf), load_safetensors_dir(back)
    if family == "qwen2":
        assert (hf / "model.safetensors.index.json").exists()  # the input really was sharded
        assert len(list(back.glob("model-*-of-*.safetensors"))) > 1
        index = json.loads((back / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(converted)
    assert sorted(original) == sorted(converted)
    dtype = torch.bfloat16 if "--dtype" in to_megatron_args else torch.float32
    for name, tensor in original.items():
        assert converted[name].dtype == dtype, name
        assert torch.equal(converted[name], tensor.to(dtype)), name
    assert (back / "tokenizer_config.json").exists()
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == str(dtype).split(".")[1]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(back)
    ids = torch.tensor([[1, 5, 9, 100]])
    reference = tiny_hf_model(family, seed=FAMILIES.index(family))
    if dtype == torch.float32:
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)


def test_bad_inputs_are_clear_errors(tmp_path):
    hf = save_hf("qwen2", tmp_path / "hf", max_shard_size="40KB")
    out = tmp_path / "out"

    # TP that does not divide the heads (4 heads, 2 KV heads)
    proc = run_tool("hf_to_megatron", "--hf", str(hf), "--out", str(out), "--tp", "3", check=False)
    assert proc.returncode == 2 and "tp=3" in proc.stderr.replace(" ", ""), proc.stderr

    # a missing shard
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    hidden = shard.rename(tmp_path / shard.name)
    proc = run_tool("hf_to_megatron", "--hf", str(hf), "--out", str(out), "--tp", "2", check=False)
    assert proc.returncode == 2 and shard.name in proc.stderr and "missing" in proc.stderr, proc.stderr
    hidden.rename(shard)

    # a config that does not match the tensors
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    proc = run_tool("hf_to_megatron", "--hf", str(hf), "--out", str(out), "--tp", "2", check=False)
    assert proc.returncode == 2 and "mlp.gate_proj.weight" in proc.stderr and "shape" in proc.stderr, proc.stderr

    # an architecture we do not build
    (hf / "config.json").write_text(json.dumps(dict(config, architectures=["GPT2LMHeadModel"])))
    proc = run_tool("hf_to_megatron", "--hf", str(hf), "--out", str(out), "--tp", "2", check=False)
    assert proc.returncode == 2 and "GPT2LMHeadModel" in proc.stderr, proc.stderr
    (hf / "config.json").write_text(json.dumps(config))

    # a non-empty output is not overwritten without --force
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = run_tool("hf_to_megatron", "--hf", str(hf), "--out", str(out), "--tp", "2", check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr, proc.stderr
    assert (out / "keep.txt").read_text() == "precious"

    # a directory that is not a complete checkpoint
    proc = run_tool("megatron_to_hf", "--ckpt", str(out), "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "lpreg_checkpoint.json" in proc.stderr, proc.stderr

    help_text = run_tool("hf_to_megatron", "--help").stdout
    assert "--tp" in help_text and "--hf" in help_text and "--out" in help_text
    assert "--ckpt" in run_tool("megatron_to_hf", "--help").stdout
