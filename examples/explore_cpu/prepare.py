"""Prepare the exploration study's task: 2-digit addition where the warm-up model's usual route
is right only without a carry, and a rarely sampled route is right on every problem.

    python -m examples.explore_cpu.prepare --out runs/explore_cpu_data              # model and prompts
    python -m examples.explore_cpu.prepare --out runs/explore_cpu_data --data-only  # prompts only

writes OUT/model/ (HF Qwen2, the demo's ~0.9M-parameter shape and tokenizer recipe), OUT/train.jsonl,
OUT/val.jsonl and OUT/prepare.json (last; its presence means OUT is complete), like
``examples/tiny_cpu/prepare.py``, whose tokenizer, model and warm-up loop this reuses.

The two routes of the warm-up targets (both digit-by-digit, so both are learnt at the same speed):

    quick (share 1 - q):  "Quick: 7 + 8 = 5, 5 + 6 = 11\\n\\boxed{115}"   drops the carry
    carry (share q):      "Carry: 7 + 8 = 15, 5 + 6 + 1 = 12\\n\\boxed{125}"

The first word of the response (after an optional opener) chooses the route. The quick route is
right only when the units do not carry (55% of problems), the carry route on all of them. After the
warm-up (until half the sampled answers are right, ~1,100 steps of 32) the logits are divided by
``--soften`` (1.5: sampling at T=1 is then the warm model at T=1.5, ~0.32 nats per token instead of
~0.17), and the model samples "Carry:" about a quarter of the time: a rare token inside the min-p
support, the "spark" RL must keep. Validation splits the problems by data source
(``explore_carry``, ``explore_plain``) so the accuracy on carry problems shows whether the rare
route was taken up. Seeded random wording (OPENERS, SEPARATORS, ENDINGS) adds harmless
alternatives, so that the warm model is unsure on several tokens besides the route.

Why this should show Lp-Reg's effect, and what the study found: docs/effect_study.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from examples.tiny_cpu import prepare as tiny
from megatron_lpreg.data import load_prompt_dataset, render_prompt
from megatron_lpreg.data.generate import BOXED_INSTRUCTION
from megatron_lpreg.data.schema import DataFields, parse_row

FORMAT_VERSION = tiny.FORMAT_VERSION
DATA_FILES, MARKER, is_complete = tiny.DATA_FILES, tiny.MARKER, tiny.is_complete  # one layout for both
# Harmless wording choices, each drawn uniformly per warm-up target: they leave the warm model
# unsure on several tokens that do not decide the answer, as a larger model's phrasing does.
OPENERS = ("", "OK. ", "So ", "Now ", "Well, ", "Let me see. ")
SEPARATORS = (", ", "; ", " then ")
ENDINGS = ("\n", " so ", "\nAnswer: ")


def carries(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def quick_answer(a: int, b: int) -> str:
    """The quick route's answer: tens summed, units summed mod 10, the carry dropped."""
    return f"{a // 10 + b // 10}{(a % 10 + b % 10) % 10}"


def response_text(a: int, b: int, careful: bool, wording: tuple[str, str, str] = ("", ", ", "\n")) -> str:
    """A warm-up target for ``a + b`` by the carry route (``careful``) or the quick route;
    ``wording`` is (opener, separator, ending), one of each of OPENERS, SEPARATORS, ENDINGS."""
    opener, sep, ending = wording
    units = a % 10 + b % 10
    if careful:
        tens = a // 10 + b // 10 + units // 10
        return (f"{opener}Carry: {a % 10} + {b % 10} = {units}{sep}{a // 10} + {b // 10} + {units // 10} = {tens}"
                f"{ending}\\boxed{{{a + b}}}")
    return (f"{opener}Quick: {a % 10} + {b % 10} = {units % 10}{sep}{a // 10} + {b // 10} = {a // 10 + b // 10}"
            f"{ending}\\boxed{{{quick_answer(a, b)}}}")


def draw_wording(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(OPENERS), rng.choice(SEPARATORS), rng.choice(ENDINGS)


def problems(n: int, seed: int, data_source=None) -> list[dict]:
    """``n`` verl-schema rows "What is a + b?", a, b in 10..99; ``data_source`` None names each row
    ``explore_carry`` or ``explore_plain``. Depends only on the arguments."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        source = data_source or ("explore_carry" if carries(a, b) else "explore_plain")
        rows.append({
            "data_source": source,
            "prompt": [{"role": "user", "content": f"What is {a} + {b}?\n{BOXED_INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"index": i, "question": f"What is {a} + {b}?", "expression": f"{a} + {b}",
                           "carry": carries(a, b)},
        })
    return rows


def _write_rows(path: Path, rows) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def write_data(out: Path, seed: int = 0, train_size: int = 2048, val_size: int = 128) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_rows(out / DATA_FILES[0], problems(train_size, seed + 1, data_source="explore"))
    _write_rows(out / DATA_FILES[1], problems(val_size, seed + 2))


def route_stats(model_dir: Path, records, n: int = 8) -> dict:
    """Sample ``n`` per prompt at T=1 with the trainer's rollout engine: the share of "Carry" routes,
    accuracy per route and per problem kind, and the mean per-token entropy of the responses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_lpreg.rewards import grade
    from megatron_lpreg.rollout.engine import SamplingParams
    from megatron_lpreg.rollout.hf_engine import HFEngine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    prompts = [tokenizer(render_prompt(r, "chat", tokenizer), add_special_tokens=False)["input_ids"] for r in records]
    out = HFEngine(model, tokenizer.pad_token_id).generate(
        prompts, SamplingParams(n=n, temperature=1.0, max_tokens=48, stop_token_ids=(tokenizer.eos_token_id,), seed=0))
    count = {k: [0, 0] for k in ("carry_route", "quick_route", "carry_problems", "plain_problems")}
    entropy_sum, tokens, carry_route = 0.0, 0, 0
    for record, prompt, group in zip(records, prompts, out):
        kind = "carry_problems" if record.data_source == "explore_carry" else "plain_problems"
        for c in group:
            text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            r = grade(text, record.ground_truth)
            route = "carry_route" if "Carry:" in text else "quick_route"
            carry_route += route == "carry_route"
            for key in (route, kind):
                count[key][0] += r
                count[key][1] += 1
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(c.token_ids)])).logits[0, len(prompt) - 1:-1]
            logp = torch.log_softmax(logits.float(), -1)
            entropy_sum += float(-(logp.exp() * logp).sum(-1).sum())
            tokens += len(c.token_ids)
    total = n * len(records)
    stats = {f"acc_{k}": (v[0] / v[1] if v[1] else float("nan")) for k, v in count.items()}
    return dict(carry_route_share=carry_route / total, reward=sum(v[0] for k, v in count.items() if k.endswith("route")) / total,
                entropy_per_token=entropy_sum / max(tokens, 1), **stats)


def soften_model(model_dir: Path, temperature: float) -> None:
    """Divide the final norm's weight by ``temperature`` and save: the model's logits become the warm
    model's divided by it, so sampling it at T=1 is sampling the warm model at T=``temperature``.

    The supervised warm-up is cross entropy on one target per position, so it ends sharper than a
    pretrained model's (entropy ~0.17 nats per token here); softening restores the spread that the
    paper's base models start RL with, on every token: the route, the wording and the digits.
    The output layer has no bias and the final norm feeds only it, so this divides the logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    with torch.no_grad():
        model.model.norm.weight.div_(temperature)
    model.save_pretrained(model_dir)


def prepare(out: Path, seed: int = 0, train_size: int = 2048, val_size: int = 128, warmup_steps: int = 1500,
            carry_share: float = 0.15, batch_size: int = 32, lr: float = 3e-3, target_accuracy: float = 0.5,
            soften: float = 1.5, log=print) -> Path:
    """Build OUT (see the module docstring). The warm-up stops once the sampled accuracy on RL
    prompts reaches ``target_accuracy`` (both routes' arithmetic learnt; the quick route caps it
    near 0.55 + 0.45 * carry_share) or after ``warmup_steps`` steps of ``batch_size``."""
    out = Path(out)
    if is_complete(out):
        log(f"{out} is complete ({MARKER} present): nothing to do")
        return out
    if out.exists() and set(os.listdir(out)) - set(DATA_FILES):
        raise SystemExit(f"{out} exists, is not empty and is not complete ({MARKER} missing): remove it")
    torch.manual_seed(seed)
    started = time.perf_counter()
    tmp = out.parent / f"{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_data(tmp, seed, train_size, val_size)
        val = list(load_prompt_dataset(tmp / DATA_FILES[1]))
        held_out = {r.question for r in val}
        rows = [row for row in problems(40_000, seed + 3, data_source="warmup")
                if row["prompt"][0]["content"] not in held_out]
        records = [parse_row(row, i, DataFields()) for i, row in enumerate(rows)]
        rng = random.Random(seed)
        texts = []
        for r, row in zip(records, rows):
            a, b = map(int, row["extra_info"]["expression"].split(" + "))
            texts.append((tiny.chatml(r.messages()),
                          response_text(a, b, rng.random() < carry_share, draw_wording(rng)) + tiny.EOS))
        tokenizer, examples = tiny.tokenized(texts, records[0])
        model = tiny.build_model(tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"tokenizer: {len(tokenizer)} tokens; model: {n_params / 1e6:.2f}M parameters; {len(examples)} examples")
        check = tiny.arithmetic_accuracy(tokenizer, list(load_prompt_dataset(tmp / DATA_FILES[0]))[:32], seed=seed)
        steps, accuracy, warm_s = tiny.warm_up(model, examples, warmup_steps, batch_size, lr, seed, check,
                                               target_accuracy, check_every=50, log=log)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        if soften != 1.0:
            soften_model(tmp / "model", soften)
        stats = route_stats(tmp / "model", val[:48])
        log("start point on 48 val prompts x 8 samples at T=1: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
        info = dict(format_version=FORMAT_VERSION, seed=seed, train_size=train_size, val_size=val_size,
                    carry_share=carry_share, soften=soften, warmup_steps=steps, max_warmup_steps=warmup_steps,
                    warmup_accuracy=accuracy, target_accuracy=target_accuracy, batch_size=batch_size, lr=lr,
                    parameters=n_params, vocab_size=len(tokenizer), warmup_seconds=round(warm_s, 1),
                    total_seconds=round(time.perf_counter() - started, 1), **stats)
        tiny.publish(tmp, out, info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} in {info['total_seconds']:.0f}s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build the exploration study's model and prompt files.")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--carry-share", type=float, default=0.15, help="share q of carry-route warm-up targets")
    p.add_argument("--warmup-steps", type=int, default=1500, help="at most this many steps of 32 examples")
    p.add_argument("--target-accuracy", type=float, default=0.5)
    p.add_argument("--soften", type=float, default=1.5,
                   help="divide the warm model's logits by this (sampling at T=1 = the warm model at T=SOFTEN)")
    p.add_argument("--data-only", action="store_true", help="write only train.jsonl and val.jsonl")
    args = p.parse_args(argv)
    if args.data_only:
        write_data(args.out, seed=args.seed)
        return 0
    prepare(args.out, seed=args.seed, carry_share=args.carry_share, warmup_steps=args.warmup_steps,
            target_accuracy=args.target_accuracy, soften=args.soften)
    return 0


if __name__ == "__main__":
    sys.exit(main())
