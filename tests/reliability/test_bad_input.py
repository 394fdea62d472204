"""Bad input of every kind a user can hand the trainer: each fails in one line naming the file, the
row or line, and the field, with no traceback from inside a library.

Most cases call the loaders in-process (config, preflight, prompt files); the checkpoint loads run
in one spawned world of one (megatron's loader needs its process groups); a few go through the real
command line and check exit status 2, a one-line stderr and no traceback. ``CASES`` is the table
of classes: id, an example of the input, and the parts the message must contain.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from megatron_lpreg.commands import USER_ERRORS
from megatron_lpreg.config import load_config
from megatron_lpreg.data import load_prompt_dataset
from megatron_lpreg.commands.preflight import check_run

ROOT = Path(__file__).resolve().parents[2]
GOOD_ROW = {"prompt": [{"role": "user", "content": "1+1?"}], "data_source": "arith",
            "reward_model": {"ground_truth": "2"}}


# ------------------------------------------------------------------------------------------ setup
# A tiny Qwen2 shape (4 heads, 2 KV heads, FFN 96, 2 layers): every check before the weights reads only
# config.json, the HF-weights check only the safetensors header, and megatron builds it in a second.
TINY_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 101, "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "tie_word_embeddings": False,
              "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": "float32"}


@dataclass
class Env:
    root: Path
    policy: Path  # config.json + one small safetensors file (no tokenizer: nothing here reads it)
    train: Path
    ckpt: Path  # a complete model checkpoint of ``policy`` (TP=1); corrupted copies go beside it
    rank_errors: dict  # what a rank's load_model said about each corrupted copy (see _checkpoint_body)
    base: list[str] = field(default_factory=list)

    def model_variant(self, name: str, **changes) -> Path:
        return _model_dir(self.root / name, **changes)

    def ckpt_copy(self, name: str) -> Path:
        return _ckpt_copy(self.ckpt, name)


def _model_dir(out: Path, weights: bool = False, **changes) -> Path:
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps({**TINY_QWEN2, **changes}))
    if weights:
        import torch
        from safetensors.torch import save_file

        save_file({"model.norm.weight": torch.ones(TINY_QWEN2["hidden_size"])}, str(out / "model.safetensors"))
    return out


def _ckpt_copy(good: Path, name: str) -> Path:
    out = good.parent / name
    if not out.exists():
        shutil.copytree(good, out)
    return out


def _truncate_shard(good: Path) -> Path:
    if (good.parent / "truncated").exists():
        return good.parent / "truncated"
    path = _ckpt_copy(good, "truncated")
    shard = sorted((path / "iter_0000000").glob("*.distcp"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return path


def _drop(good: Path, name: str, pattern: str) -> Path:
    path = _ckpt_copy(good, name)
    for item in path.glob(pattern):
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    return path


def _no_marker(good: Path) -> Path:
    """Neither our marker nor Megatron-LM's tracker: what an interrupted save of either leaves."""
    path = _drop(good, "no_marker", "lpreg_checkpoint.json")
    (path / "latest_checkpointed_iteration.txt").unlink(missing_ok=True)
    return path


def _edit_marker(good: Path, name: str, text: str) -> Path:
    path = _ckpt_copy(good, name)
    (path / "lpreg_checkpoint.json").write_text(text)
    return path


def _checkpoint_body(ctx, root: str):
    """Save a checkpoint of the tiny model, break copies of it, and record what load_model says about
    each inside a rank (under torchrun no preflight runs: the rank's own message must be clear too)."""
    import torch

    from megatron_lpreg import checkpointing
    from megatron_lpreg.megatron_layout import megatron_args
    from megatron_lpreg.model import build_gpt_model, padded_vocab_size, parse_hf_config

    root = Path(root)
    spec = parse_hf_config(root / "policy")
    meta = checkpointing.model_metadata(spec, source=root / "policy", dtype=torch.float32, tp_size=1,
                                        padded_vocab_size=padded_vocab_size(spec.vocab_size, 1))
    good = root / "ckpts" / "good"
    args = megatron_args(spec, tp_size=1, dtype=torch.float32, padded_vocab_size=meta["padded_vocab_size"],
                         iteration=0)
    checkpointing.save_model(build_gpt_model(spec, torch.float32, use_te=False), good, meta, args=args,
                             hf_source=root / "policy")
    broken = {"good": (root / "policy", good), "truncated": (root / "policy", _truncate_shard(good)),
              "no-shard": (root / "policy", _drop(good, "no_shard", "iter_0000000/*.distcp")),
              "no-group": (root / "policy", _drop(good, "no_group", "iter_0000000")),
              "no-marker": (root / "policy", _no_marker(good)),
              "other-shape": (root / "narrow", good), "other-layer-count": (root / "deep", good)}
    out = {}
    for name, (model_dir, path) in broken.items():
        model = build_gpt_model(parse_hf_config(model_dir), torch.float32, use_te=False)
        try:
            checkpointing.load_model(model, path)
            out[name] = None
        except checkpointing.CheckpointError as e:
            out[name] = str(e)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    from tests.distributed import run_distributed

    root = tmp_path_factory.mktemp("bad_input")
    policy = _model_dir(root / "policy", weights=True)
    _model_dir(root / "narrow", hidden_size=32)
    _model_dir(root / "deep", num_hidden_layers=3)
    train = _write_jsonl(root / "train.jsonl", [GOOD_ROW] * 8)
    rank_errors = run_distributed(_checkpoint_body, 1, 1, args=(str(root),))[0]
    e = Env(root, policy, train, root / "ckpts" / "good", rank_errors)
    e.base = [f"model.path={policy}", f"data.train_files=[{train}]", "rollout.n=2", "grpo.prompts_per_step=4",
              "grpo.mini_batch_prompts=2", f"run_dir={root / 'run'}", "checkpoint.resume=never"]
    return e


def _write_jsonl(path: Path, rows, raw: bytes = b"") -> Path:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + raw)
    return path


def _write_parquet(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _preflight(env: Env, *overrides: str, world: int = 1) -> None:
    check_run(load_config(None, [*env.base, *overrides]), world)


def _yaml(env: Env, text: str | bytes) -> Callable[[], object]:
    path = env.root / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return lambda: load_config(path)


def _rows(env: Env, fmt: str, rows, name: str, raw: bytes = b"") -> Callable[[], object]:
    path = env.root / f"{name}.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, rows, raw)
    else:
        _write_parquet(path, rows)
    return lambda: load_prompt_dataset(path)


def _with(**changes) -> dict:
    return {**GOOD_ROW, **changes}


def _truncated_safetensors(env: Env) -> str:
    out = env.root / "policy_truncated"
    if not out.exists():
        shutil.copytree(env.policy, out)
        shard = out / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return str(out)


def _no_weights(env: Env) -> str:
    out = env.root / "policy_no_weights"
    if not out.exists():
        shutil.copytree(env.policy, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return str(out)


# ------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    id: str
    example: str
    call: Callable[[Env], Callable[[], object]]  # env -> the call that must fail
    expect: Callable[[Env], list[str]] | tuple[str, ...]  # parts of the message (file, line/row, field, why)


def _case(id, example, call, *expect):
    return Case(id, example, call, expect[0] if len(expect) == 1 and callable(expect[0]) else tuple(expect))


CASES = [
    # ---- run configuration (YAML file, command-line overrides)
    _case("config-unknown-key", "modle: {path: x}", lambda e: _yaml(e, "modle:\n  path: x\n"),
          "run.yaml:1: modle: unknown key"),
    _case("config-misspelt-nested-key", "grpo.prompts_per_stepp: 8 (line 3)",
          lambda e: _yaml(e, "grpo:\n  steps: 3\n  prompts_per_stepp: 8\n"),
          "run.yaml:3: grpo.prompts_per_stepp: unknown key", "prompts_per_step"),
    _case("config-wrong-type", "grpo.steps: three", lambda e: _yaml(e, "grpo:\n  steps: three\n"),
          "run.yaml:2: grpo.steps: expected an integer, got 'three'"),
    _case("config-bool-for-int", "grpo.steps: yes", lambda e: _yaml(e, "grpo:\n  steps: yes\n"),
          "run.yaml:2: grpo.steps: expected an integer, got True"),
    _case("config-wrong-list-item", "data.train_files: [a.jsonl, {b: 1}]",
          lambda e: _yaml(e, "data:\n  train_files: [a.jsonl, {b: 1}]\n"),
          "run.yaml:2: data.train_files[1]: expected a string"),
    _case("config-bad-enum", "model.dtype: fp8", lambda e: _yaml(e, "model:\n  dtype: fp8\n"),
          "run.yaml:2: model.dtype: 'fp8' is not one of"),
    _case("config-bad-preset", "loss.preset: ppo", lambda e: _yaml(e, "loss:\n  preset: ppo\n"),
          "run.yaml:2: loss.preset: unknown preset 'ppo'"),
    _case("config-out-of-range", "loss.rho: 2", lambda e: _yaml(e, "loss:\n  rho: 2\n"),
          "run.yaml:2: loss.rho:", "[0, 1]"),
    _case("config-negative-lr", "optim.lr: -1e-6", lambda e: _yaml(e, "optim:\n  lr: -1.0e-6\n"),
          "run.yaml:2: optim.lr: must be non-negative"),
    _case("config-rollout-n-below-2", "rollout.n: 1", lambda e: _yaml(e, "rollout:\n  n: 1\n"),
          "run.yaml:2: rollout.n:", "at least 2"),
    _case("config-mini-batch-not-dividing", "prompts_per_step: 6, mini_batch_prompts: 4",
          lambda e: _yaml(e, "grpo:\n  prompts_per_step: 6\n  mini_batch_prompts: 4\n"),
          "run.yaml:3: grpo.mini_batch_prompts: 4 does not divide grpo.prompts_per_step=6"),
    _case("config-yaml-syntax", "a key indented one space too far",
          lambda e: _yaml(e, "grpo:\n  steps: 3\n   x: 1\n"), "run.yaml:3: not valid YAML"),
    _case("config-top-level-not-mapping", "- grpo\\n- model", lambda e: _yaml(e, "- grpo\n- model\n"),
          "run.yaml: the top level must be a mapping of sections, got list"),
    _case("config-section-not-mapping", "grpo: 5", lambda e: _yaml(e, "grpo: 5\n"),
          "run.yaml:1: grpo: expected a mapping of grpo settings"),
    _case("config-not-utf8", "byte 0xff in a value on line 2", lambda e: _yaml(e, b"grpo:\n  steps: \xff\n"),
          "run.yaml:2: not UTF-8 text (byte 0xff)"),
    _case("config-missing-file", "--config nope.yaml", lambda e: lambda: load_config(e.root / "nope.yaml"),
          "nope.yaml: cannot read config file (No such file or directory)"),
    _case("override-unknown-key", "grpo.bogus=1", lambda e: lambda: load_config(None, ["grpo.bogus=1"]),
          "command line: grpo.bogus: unknown key"),
    _case("override-bad-value", "rollout.temperature=hot",
          lambda e: lambda: load_config(None, ["rollout.temperature=hot"]),
          "command line: rollout.temperature: expected a number, got 'hot'"),
    _case("override-not-key-value", "grpo.steps", lambda e: lambda: load_config(None, ["grpo.steps"]),
          "command line: 'grpo.steps' is not key=value"),
    # ---- model directory and parallel layout (preflight, before any rank starts)
    _case("model-path-missing", "model.path=/nonexistent",
          lambda e: lambda: _preflight(e, f"model.path={e.root / 'nonexistent'}"),
          "model.path:", "nonexistent is not a directory"),
    _case("model-dir-without-config-json", "model.path=<an empty directory>",
          lambda e: lambda: _preflight(e, f"model.path={e.root}"), "model.path:", "has no config.json"),
    _case("model-config-json-invalid", "config.json: '{\"architectures\": ['",
          lambda e: (lambda p: (p.joinpath("config.json").write_text('{"architectures": ['),
                                lambda: _preflight(e, f"model.path={p}"))[1])(e.model_variant("bad_json")),
          "model.path:", "config.json: not valid JSON"),
    _case("model-unsupported-architecture", "architectures: [GPT2LMHeadModel]",
          lambda e: lambda: _preflight(e, f"model.path={e.model_variant('gpt2', architectures=['GPT2LMHeadModel'])}"),
          "gpt2/config.json: field 'architectures'", "GPT2LMHeadModel"),
    _case("model-unsupported-activation", "hidden_act: gelu",
          lambda e: lambda: _preflight(e, f"model.path={e.model_variant('gelu', hidden_act='gelu')}"),
          "gelu/config.json: field 'hidden_act'", "'gelu' is not supported"),
    _case("model-without-weights", "config.json and tokenizer, no *.safetensors",
          lambda e: lambda: _preflight(e, f"model.path={_no_weights(e)}"),
          "model.path:", "policy_no_weights: no *.safetensors files"),
    _case("model-truncated-safetensors", "model.safetensors cut in half",
          lambda e: lambda: _preflight(e, f"model.path={_truncated_safetensors(e)}"),
          "model.path:", "model.safetensors: not a readable safetensors file"),
    _case("tp-not-dividing-heads", "parallel.tp=3, 4 attention heads",
          lambda e: lambda: _preflight(e, "parallel.tp=3", world=3),
          "parallel.tp: tp=3 does not divide num_attention_heads=4", "valid tp for this model: [1, 2]",
          "policy/config.json"),
    _case("tp-not-dividing-kv-heads", "parallel.tp=2, 1 KV head",
          lambda e: lambda: _preflight(e, f"model.path={e.model_variant('kv1', num_key_value_heads=1)}",
                                       "parallel.tp=2", world=2),
          "parallel.tp: tp=2 does not divide num_key_value_heads=1", "kv1/config.json"),
    _case("tp-not-dividing-world", "parallel.tp=2 with 3 processes",
          lambda e: lambda: _preflight(e, "parallel.tp=2", world=3),
          "parallel.tp=2: 3 processes", "do not form whole tensor-parallel groups"),
    _case("prompts-not-divisible-by-dp", "prompts_per_step=6 with 4 data-parallel ranks",
          lambda e: lambda: _preflight(e, "grpo.prompts_per_step=6", "grpo.mini_batch_prompts=6", world=4),
          "grpo.prompts_per_step=6 is not divisible by the data-parallel size 4"),
    _case("train-file-missing", "data.train_files=[missing.jsonl]",
          lambda e: lambda: _preflight(e, f"data.train_files=[{e.root / 'missing.jsonl'}]"),
          "data.train_files:", "missing.jsonl does not exist"),
    _case("validation-file-missing", "validation.files=[missing_val.parquet]",
          lambda e: lambda: _preflight(e, f"validation.files=[{e.root / 'missing_val.parquet'}]"),
          "validation.files:", "missing_val.parquet does not exist"),
    _case("reward-function-unimportable", "reward.function=no_such_module:score",
          lambda e: lambda: _preflight(e, "reward.function=no_such_module:score"),
          "reward.function='no_such_module:score': cannot import it"),
    # ---- prompt files (JSONL lines are 1-based physical lines, Parquet rows 0-based)
    *[c for fmt, where in (("jsonl", "line 2"), ("parquet", "row 1")) for c in (
        _case(f"data-missing-prompt-field-{fmt}", "row without 'prompt'",
              lambda e, f=fmt: _rows(e, f, [GOOD_ROW, {"data_source": "a", "reward_model": {"ground_truth": "1"}}],
                                     "no_prompt"),
              # a Parquet column exists for every row: the row without it reads as null
              f"no_prompt.{fmt}: {where}: field 'prompt': " + ("missing field" if fmt == "jsonl" else "field is null")),
        _case(f"data-empty-prompt-{fmt}", "prompt: '   '",
              lambda e, f=fmt: _rows(e, f, [_with(prompt="x"), _with(prompt="   ")], "empty_prompt"),
              f"empty_prompt.{fmt}: {where}: field 'prompt': empty prompt"),
        _case(f"data-wrong-ground-truth-type-{fmt}", "ground_truth: [1, 2]",
              lambda e, f=fmt: _rows(e, f, [_with(reward_model={"ground_truth": ["1"]}),
                                            _with(reward_model={"ground_truth": ["1", "2"]})], "bad_truth"),
              f"bad_truth.{fmt}: {where}: field 'reward_model.ground_truth': expected a single answer"),
        _case(f"data-bad-message-structure-{fmt}", "prompt: [{role: user}] (no content)",
              lambda e, f=fmt: _rows(e, f, [_with(prompt=[{"role": "user", "content": "q"}]),
                                            _with(prompt=[{"role": "user", "content": None}])], "bad_message"),
              f"bad_message.{fmt}: {where}: field 'prompt': message 0 has 'content' of type NoneType"),
        _case(f"data-huge-row-{fmt}", "a 9 MB prompt (limit 8 MB)",
              lambda e, f=fmt: _rows(e, f, [GOOD_ROW, _with(prompt=[{"role": "user", "content": "x" * (9 << 20)}])],
                                     "huge"),
              f"huge.{fmt}: {where}", "8 MB row limit"),
        _case(f"data-empty-file-{fmt}", "0 rows",
              lambda e, f=fmt: _rows(e, f, [], "empty") if f == "jsonl" else (
                  lambda p: (_write_parquet_empty(p), lambda: load_prompt_dataset(p))[1])(e.root / "empty.parquet"),
              f"empty.{fmt}: no prompt rows (the file is empty)"),
    )],
    _case("data-no-user-message-jsonl", "prompt: [{role: system, ...}]",
          lambda e: _rows(e, "jsonl", [GOOD_ROW, _with(prompt=[{"role": "system", "content": "hi"}])], "no_user"),
          "no_user.jsonl: line 2: field 'prompt': message list has no 'user' message"),
    _case("data-not-utf8-jsonl", "Latin-1 'café' (byte 0xe9) on line 2",
          lambda e: _rows(e, "jsonl", [GOOD_ROW], "latin1", raw=b'{"prompt": "caf\xe9"}\n'),
          "latin1.jsonl: line 2: not UTF-8 text (byte 0xe9 at column 16)"),
    _case("data-invalid-json-line", "line 2: {\"prompt\": ",
          lambda e: _rows(e, "jsonl", [GOOD_ROW], "bad_json", raw=b'{"prompt": \n'),
          "bad_json.jsonl: line 2: invalid JSON (Expecting value at column"),
    _case("data-json-nesting-bomb", "line 2: 100000 nested '['",
          lambda e: _rows(e, "jsonl", [GOOD_ROW], "deep", raw=b"[" * 100_000 + b"\n"),
          "deep.jsonl: line 2: invalid JSON (nested too deeply)"),
    _case("data-row-not-object", "line 2: [1, 2]",
          lambda e: _rows(e, "jsonl", [GOOD_ROW, [1, 2]], "list_row"),
          "list_row.jsonl: line 2: row is a list, expected a JSON object"),
    _case("data-not-parquet", "text in a .parquet file",
          lambda e: (lambda p: (p.write_text("hello\n" * 10), lambda: load_prompt_dataset(p))[1])(e.root / "text.parquet"),
          "text.parquet: cannot read as Parquet (file:"),
    _case("data-unknown-suffix", "prompts.csv",
          lambda e: (lambda p: (p.write_text("a,b\n"), lambda: load_prompt_dataset(p))[1])(e.root / "prompts.csv"),
          "prompts.csv: cannot tell the format from the file name"),
    _case("data-all-rows-skipped", "data.on_error=skip, every row bad",
          lambda e: (lambda p: lambda: load_prompt_dataset(p, on_error="skip"))(
              _write_jsonl(e.root / "all_bad.jsonl", [{"x": 1}, {"y": 2}])),
          "all_bad.jsonl: no usable prompt rows: all 2 were skipped", "line 1: field 'prompt': missing field"),
    # ---- checkpoints (preflight reads metadata, shard indexes and file sizes; no model built)
    _case("ckpt-no-completion-marker", "model.load=<dir without lpreg_checkpoint.json or Megatron-LM's tracker>",
          lambda e: lambda: _preflight(e, f"model.load={_no_marker(e.ckpt)}"),
          "model.load:", "no_marker: not a checkpoint (no lpreg_checkpoint.json, no latest_checkpointed_iteration.txt"),
    _case("ckpt-metadata-invalid-json", "lpreg_checkpoint.json cut mid-object",
          lambda e: lambda: _preflight(e, "model.load=" + str(_edit_marker(e.ckpt, "bad_marker", '{"format": 1,'))),
          "model.load:", "bad_marker/lpreg_checkpoint.json: not valid JSON"),
    _case("ckpt-metadata-wrong-format", "lpreg_checkpoint.json: {\"format\": 9}",
          lambda e: lambda: _preflight(e, "model.load=" + str(_edit_marker(e.ckpt, "format9", '{"format": 9}'))),
          "model.load:", "format9/lpreg_checkpoint.json: format 9, this code reads 1 and 2"),
    _case("ckpt-truncated-shard", "iter_0000000/ a .distcp cut in half",
          lambda e: lambda: _preflight(e, f"model.load={_truncate_shard(e.ckpt)}"),
          "model.load:", "truncated/iter_0000000/", ".distcp: truncated ("),
    _case("ckpt-missing-shard-file", "iter_0000000/*.distcp deleted",
          lambda e: lambda: _preflight(e, f"model.load={_drop(e.ckpt, 'no_shard', 'iter_0000000/*.distcp')}"),
          "model.load:", "no_shard/iter_0000000/", ".distcp: missing shard file"),
    _case("ckpt-missing-group", "iter_0000000/ deleted",
          lambda e: lambda: _preflight(e, f"model.load={_drop(e.ckpt, 'no_group', 'iter_0000000')}"),
          "model.load:", "no_group/latest_checkpointed_iteration.txt names iter_0000000, which is not a torch_dist"),
    _case("ckpt-other-model-shape", "checkpoint of hidden 64 into a hidden-32 model",
          lambda e: lambda: _preflight(e, f"model.path={e.root / 'narrow'}",
                                       f"model.load={e.ckpt}"),
          "model.load:", "holds a model with hidden_size=64, model.path has hidden_size=32"),
    _case("ckpt-other-layer-count", "2-layer checkpoint into a 3-layer model",
          lambda e: lambda: _preflight(e, f"model.path={e.root / 'deep'}",
                                       f"model.load={e.ckpt}"),
          "model.load:", "holds a model with num_layers=2, model.path has num_layers=3"),
    _case("ckpt-resume-model-only", "checkpoint.resume=<a converted model checkpoint, no optimiser>",
          lambda e: lambda: _preflight(e, f"checkpoint.resume={e.ckpt}"),
          "checkpoint.resume:", "good has no optimiser state (optim/): a model checkpoint, not a training checkpoint"),
    _case("ckpt-resume-path-missing", "checkpoint.resume=runs/x/checkpoints/step_000007",
          lambda e: lambda: _preflight(e, f"checkpoint.resume={e.root / 'step_000007'}"),
          "checkpoint.resume:", "step_000007 does not exist"),
]


def _write_parquet_empty(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("prompt", pa.string()), ("data_source", pa.string())])
    pq.write_table(schema.empty_table(), path)


def _expected(case: Case, env: Env) -> list[str]:
    return list(case.expect(env)) if callable(case.expect) else list(case.expect)


def assert_one_clear_line(message: str, parts: list[str]) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_in_one_clear_line(env, case):
    call = case.call(env)
    with pytest.raises(USER_ERRORS) as info:
        call()
    assert_one_clear_line(str(info.value), _expected(case, env))


def test_the_good_inputs_pass_and_a_checkpoint_loads_at_another_tp(env):
    """The cases above differ from a passing setup only by what they break; a TP=1 checkpoint is not
    an error at TP=2 (dist_checkpointing reshards on load: tests/test_checkpointing.py)."""
    _preflight(env)
    _preflight(env, f"model.load={env.ckpt}", "parallel.tp=2", world=2)
    assert len(load_prompt_dataset(env.train)) == 8
    assert {c.id for c in CASES} == {c.id for c in {c.id: c for c in CASES}.values()}  # ids unique
    assert len(CASES) >= 30


def test_ranks_loading_bad_checkpoints_say_what_is_wrong_in_one_line(env):
    got = env.rank_errors
    assert got["good"] is None
    expected = {
        "truncated": [".distcp: truncated ("], "no-shard": [".distcp: missing shard file"],
        "no-group": ["names iter_0000000, which is not a torch_dist checkpoint"],
        "no-marker": ["no lpreg_checkpoint.json, no latest_checkpointed_iteration.txt"],
        # the shapes are checked against the checkpoint's index before megatron's loader runs
        "other-shape": ["good/iter_0000000: embedding.word_embeddings.weight has shape (128, 64), "
                        "this model's is (128, 32)"],
        "other-layer-count": ["holds a 2-layer model", "this model has 3 layers"],
    }
    for name, parts in expected.items():
        assert got[name] is not None, name
        assert_one_clear_line(got[name], parts)


# ---------------------------------------------------------------------------- the real command line
def test_cli_bad_input_exits_2_with_one_line(env):
    """As a user runs it: status 2, one line on stderr, no traceback, nothing started."""
    bad_data = _write_jsonl(env.root / "cli_bad.jsonl", [GOOD_ROW, _with(prompt="")])
    config = env.root / "cli.yaml"  # without --config, train runs the demo
    config.write_text("rollout: {n: 2}\n")
    base = ["--config", str(config), *env.base]
    runs = {
        "unknown-subcommand": (["trian"], "invalid choice: 'trian'"),
        "missing-config": (["train", "--config", str(env.root / "nope.yaml")], "nope.yaml: cannot read config file"),
        "bad-row": (["train", *base, f"data.train_files=[{bad_data}]"],
                    "cli_bad.jsonl: line 2: field 'prompt': empty prompt"),
        # at TP=3 the command would start 3 ranks under torchrun: it must fail before that
        "tp-not-dividing-heads": (["train", *base, "parallel.tp=3"], "does not divide num_attention_heads=4"),
    }
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = {name: subprocess.Popen([sys.executable, "-m", "megatron_lpreg.cli", *argv], cwd=env.root, env=environ,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in runs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (name, err[-2000:])
        assert lines[0].startswith("megatron-lpreg") and runs[name][1] in lines[0], (name, lines[0])
        assert "torch.distributed.run" not in out + err
