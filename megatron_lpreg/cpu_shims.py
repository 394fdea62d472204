"""What megatron-core 0.16 needs to run on CPU (gloo). Applied by ``init_distributed`` only when no
GPU is present, because each shim changes global torch or megatron state.

1. ``torch.cuda.current_device`` -> "cpu": megatron passes ``device=torch.cuda.current_device()``
   when it creates parameters and buffers.
2. A CPU RNG tracker in place of megatron's CUDA one: its tracker forks ``torch.cuda`` generator
   states for tensor-parallel weight init and dropout.
3. ``torch.cuda.synchronize`` -> no-op: dist_checkpointing calls it around saves and loads.
4. megatron's CUDA RNG state get/set -> the CPU generator: activation recomputation saves and
   restores it around each recomputed layer.
5. ``causal_attention_mask``: megatron's unfused attention creates its default causal mask on
   "cuda", so CPU callers of that attention pass this explicit one (the local spec's default SDPA
   attention needs none).
"""

from __future__ import annotations

import contextlib

import torch

_ORIGINALS: dict[str, object] = {}


class CPURNGStatesTracker:
    """megatron's CudaRNGStatesTracker interface over CPU generator states."""

    def __init__(self):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"RNG state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name} is not added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


def applied() -> bool:
    return bool(_ORIGINALS)


def apply() -> None:
    """Install the shims; a no-op with a GPU present or when already installed."""
    if torch.cuda.is_available() or applied():
        return
    import megatron.core.tensor_parallel.random as mrandom

    _ORIGINALS["current_device"] = torch.cuda.current_device
    _ORIGINALS["synchronize"] = torch.cuda.synchronize
    _ORIGINALS["tracker"] = (mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    _ORIGINALS["rng_state"] = (mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state)
    # Activation recomputation saves and restores "the CUDA RNG state" around each layer; on CPU
    # the CPU generator (which megatron restores itself) is the whole state.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def remove() -> None:
    """Restore what ``apply`` replaced (for tests)."""
    if not applied():
        return
    import megatron.core.tensor_parallel.random as mrandom

    torch.cuda.current_device = _ORIGINALS["current_device"]
    torch.cuda.synchronize = _ORIGINALS["synchronize"]
    mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = _ORIGINALS["tracker"]
    mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = _ORIGINALS["rng_state"]
    _ORIGINALS.clear()


def model_parallel_cpu_manual_seed(seed: int) -> None:
    """CPU twin of megatron's ``model_parallel_cuda_manual_seed``: same three named streams, same seeds."""
    import megatron.core.tensor_parallel.random as mrandom
    from megatron.core import parallel_state

    apply()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    torch.manual_seed(seed)
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


def causal_attention_mask(seq_len: int, device="cpu") -> torch.Tensor:
    """[1, 1, s, s] bool, True where attention is masked out (a key after the query)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1).view(1, 1, seq_len, seq_len)
