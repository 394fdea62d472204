"""A refit's extra memory is bounded by its bucket size, not by the model size (TP=2, gloo, CPU).

Measured on the receiving rank as the resident set's high-water mark (VmHWM, reset through
/proc/self/clear_refs before the refit) minus the resident set before it. The ranks start with glibc told to mmap every
allocation of 256 KiB or more (``MALLOC_MMAP_THRESHOLD_``, which also stops glibc raising that
threshold itself), so a freed tensor leaves the resident set at once and RSS follows the bytes held
in live tensors (torch's CPU allocator keeps no cache of its own). Set at run time instead, heap
chunks left from earlier allocations get reused and kept, and the same refit measured 36-79 MB.

The bound is about two buckets, not one: a bucket's merged full tensors, the other rank's half in
the receive buffer, and this rank's packed half (measured 15 MB for 8 MB buckets; before the
generator dropped the previous bucket and received point to point it was 32 MB, see docs/refit.md).
"""

from __future__ import annotations

import sys

import pytest

from megatron_lpreg.memory import (
    release_freed_memory, reset_resident_peak, resident_bytes, resident_peak_bytes, resident_peak_measurable,
)
from tests.distributed import run_distributed

MB = 1024**2
BUCKET = 8 * MB
CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 512,
    "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
    "vocab_size": 2000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 256,
}


def _body(ctx):
    import torch.distributed as dist
    from transformers import AutoConfig

    from megatron_lpreg.model import build_gpt_model, parse_hf_config
    from megatron_lpreg.rollout import HFEngine
    from megatron_lpreg.weights.stream import RefitStats, stream_hf_weights

    spec = parse_hf_config(CONFIG)
    model = build_gpt_model(spec).eval()
    engine = None
    if ctx.tp_rank == 0:
        kwargs = {k: v for k, v in CONFIG.items() if k != "model_type"}
        engine = HFEngine.from_config(AutoConfig.for_model("qwen2", **kwargs))

    def refit():
        stats = RefitStats()
        for bucket in stream_hf_weights(model, spec, tp_group=ctx.tp_group, bucket_bytes=BUCKET,
                                        dst_tp_rank=0, stats=stats):
            if engine is not None:
                engine.update_weights(bucket)
        return stats

    refit()  # warm-up: lazy imports and first-call allocations are not the refit's
    measurable = resident_peak_measurable()
    release_freed_memory()
    dist.barrier(group=ctx.tp_group)
    base = resident_bytes()
    reset_resident_peak()
    stats = refit()
    peak = resident_peak_bytes() - base
    model_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters()) if engine else 0
    return dict(measurable=measurable, peak=peak, stats=stats, model_bytes=model_bytes)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset needs Linux /proc")
def test_refit_peak_memory_is_bounded_by_buckets_not_model_size(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))  # read by glibc in the spawned ranks
    result = run_distributed(_body, 2, 2, timeout_s=120)[0]
    if not result["measurable"]:
        pytest.skip("/proc/self/clear_refs cannot reset VmHWM here")
    stats, peak, model_bytes = result["stats"], result["peak"], result["model_bytes"]
    assert stats.bytes == model_bytes and stats.buckets >= 10
    largest = stats.largest_bucket_bytes
    assert largest <= BUCKET
    # Not vacuous: gathering and merging a full bucket must show up in the resident set.
    assert peak >= largest, (peak / MB, largest / MB)
    # About two buckets (merged + received half + packed half), far from the whole model (124 MB,
    # 17 buckets) or a copy of it; a kept previous bucket would make it ~4.
    assert peak <= 3 * BUCKET, (peak / MB, largest / MB)
    assert peak <= 0.4 * model_bytes, (peak / MB, model_bytes / MB)
    print(f"refit peak extra {peak / MB:.1f} MB, largest bucket {largest / MB:.1f} MB, bucket {BUCKET / MB:.0f} MB")
