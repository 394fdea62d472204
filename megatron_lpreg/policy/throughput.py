"""Model FLOPs of the passes and the device's peak, for tokens/s, FLOP/s and MFU per step.

FLOPs count matrix multiplies only (2 per multiply-add), as MFU is usually defined (PaLM, Megatron):
per token and layer the QKV, output, gate/up and down projections, plus attention's scores and
weighted sum over the causal context; the LM head per position that goes through it. A backward
costs twice its forward. Embedding lookups, norms and the loss are left out.
"""

from __future__ import annotations

import time

import torch

from megatron_lpreg.model import ModelSpec


def linear_flops_per_token(spec: ModelSpec) -> float:
    """Forward FLOPs of one token through the decoder layers' weights (no attention scores, no head)."""
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    q = spec.num_attention_heads * spec.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * spec.ffn_hidden_size
    return 2.0 * per_layer * spec.num_layers


def forward_flops(spec: ModelSpec, lengths: list[int], head_positions: int | None = None) -> float:
    """Forward FLOPs of sequences of ``lengths`` tokens; ``head_positions``: how many positions go
    through the LM head (default: every token)."""
    tokens = sum(lengths)
    q = spec.num_attention_heads * spec.head_dim
    # Causal attention: position t attends to t + 1 keys, for scores and for the weighted sum.
    attention = sum(2.0 * 2.0 * q * n * (n + 1) / 2 for n in lengths) * spec.num_layers
    head = 2.0 * spec.hidden_size * spec.vocab_size * (tokens if head_positions is None else head_positions)
    return linear_flops_per_token(spec) * tokens + attention + head


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.5) -> float:
    """Matmul FLOP/s this device reaches in ``dtype``: the best of repeated square products over
    about ``seconds``. On a shared CPU this is what the run can get, not the datasheet's number."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # first call: kernels chosen, memory allocated
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = max(best, 2.0 * size**3 / (time.perf_counter() - start))
    return best


class Stopwatch:
    """Wall time per named part. On CUDA the boundaries are events read once, when ``seconds`` is
    asked for, so timing adds no host sync inside the passes."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._laps: list[tuple[str, object, object]] = []
        self._last = None

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._last = self._now()

    def lap(self, name: str) -> None:
        """Time since the last ``start``/``lap`` goes to ``name``."""
        now = self._now()
        self._laps.append((name, self._last, now))
        self._last = now

    @property
    def seconds(self) -> dict[str, float]:
        if self.cuda and self._laps:
            self._laps[-1][2].synchronize()
        out: dict[str, float] = {}
        for name, begin, end in self._laps:
            out[name] = out.get(name, 0.0) + (begin.elapsed_time(end) / 1e3 if self.cuda else end - begin)
        return out
