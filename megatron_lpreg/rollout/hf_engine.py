"""A transformers rollout engine for CPU: batched generation with KV cache, same protocol as vLLM.

Weights arrive by refit (``update_weights``) as HF-named full tensors from the weight table, so the
engine can start without any (``HFEngine.from_config``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch

from megatron_lpreg.rollout.engine import Completion, SamplingParams


class EngineStateError(RuntimeError):
    """The engine was used while asleep without weights, or fed tensors it does not have."""


class HFEngine:
    def __init__(self, model, pad_token_id: int, max_batch_size: int = 64):
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self._missing: set[str] = set()  # parameters not loaded since the weights were dropped
        self._saved_buffers: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_pretrained(cls, directory, dtype=torch.float32, pad_token_id: int | None = None, **kwargs):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        return cls(model, _pad_id(model.config, pad_token_id), **kwargs)

    @classmethod
    def from_config(cls, config, dtype=torch.float32, pad_token_id: int | None = None, **kwargs):
        """An engine with uninitialised weights: refit before generating."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        engine = cls(model, _pad_id(config, pad_token_id), **kwargs)
        engine._missing = {n for n, _ in model.named_parameters()}
        return engine

    # -- weights ---------------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        if self._saved_buffers is not None:
            self.model.to_empty(device="cpu")
            self.model.tie_weights()  # to_empty gives tied parameters separate storage
            for name, buffer in self._saved_buffers.items():
                owner, _, leaf = name.rpartition(".")
                self.model.get_submodule(owner)._buffers[leaf] = buffer
            self._saved_buffers = None
        params = dict(self.model.named_parameters())
        loaded = 0
        for name, tensor in named_tensors:
            try:
                param = params[name]
            except KeyError:
                raise EngineStateError(f"the engine's model has no parameter {name!r}") from None
            if param.shape != tensor.shape:
                raise EngineStateError(f"{name}: engine shape {tuple(param.shape)}, refit sent {tuple(tensor.shape)}")
            param.copy_(tensor)
            self._missing.discard(name)
            loaded += 1
        return loaded

    def mark_loaded(self) -> None:
        """Every weight was written in place (the shared-memory refit, weights/shared_refit.py)."""
        self._missing.clear()

    def sleep(self, level: int = 1) -> None:
        """Level 1 keeps the weights (a CPU engine has no cache to free between calls); level 2
        frees them, as vLLM's sleep level 2 does, and the next refit re-allocates them."""
        if level >= 2 and self._saved_buffers is None:
            # Buffers (RoPE frequencies) are not weights and never refit: keep them (they are small).
            self._saved_buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
            self.model.to_empty(device="meta")
            self.model.tie_weights()
            self._missing = {n for n, _ in self.model.named_parameters()}

    def wake(self) -> None:
        pass

    def close(self) -> None:
        """Drop the model; nothing else was started."""
        self.model = None

    def _check_ready(self) -> None:
        if self._missing:
            raise EngineStateError(
                f"the engine lacks {len(self._missing)} weights (new, or asleep at level 2), e.g. "
                f"{sorted(self._missing)[:2]}: refit first")

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        self._check_ready()
        out = []
        for start in range(0, len(token_ids), self.max_batch_size):
            chunk = [list(t) for t in token_ids[start:start + self.max_batch_size]]
            ids, mask = _pad(chunk, self.pad_token_id, left=False)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            out.extend(logp[i, :len(t) - 1].clone() for i, t in enumerate(chunk))
        return out

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Completion]]:
        self._check_ready()
        rows = [list(p) for p in prompt_token_ids for _ in range(sampling.n)]
        completions: list[Completion] = []
        rng = contextlib.nullcontext() if sampling.seed is None else torch.random.fork_rng(devices=[])
        with rng:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(rows), self.max_batch_size):
                completions.extend(self._generate_batch(rows[start:start + self.max_batch_size], sampling))
        return [completions[i * sampling.n:(i + 1) * sampling.n] for i in range(len(prompt_token_ids))]

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        ids, mask = _pad(prompts, self.pad_token_id, left=True)
        greedy = sampling.temperature == 0
        stop = list(sampling.stop_token_ids)
        kwargs = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_tokens,
            eos_token_id=stop or None, pad_token_id=self.pad_token_id,
            output_logits=True, return_dict_in_generate=True, **kwargs,
        )
        new = out.sequences[:, ids.shape[1]:]
        # Raw (unprocessed) logits of each step: the engine's own log-probs of what it sampled.
        logp = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in out.logits], dim=1)
        token_logp = logp.gather(-1, new[:, :logp.shape[1], None]).squeeze(-1)
        result = []
        for i in range(len(prompts)):
            tokens = new[i].tolist()
            end = next((t + 1 for t, tok in enumerate(tokens) if tok in stop), None)
            reason = "stop" if end is not None else "length"
            end = end if end is not None else min(len(tokens), sampling.max_tokens)
            result.append(Completion(tokens[:end], token_logp[i, :end].float().clone(), reason))
        return result


def _pad_id(config, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return pad_token_id
    for candidate in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def _pad(rows: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, max_len] and attention mask; generation pads on the left, scoring on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask
