import pytest

from megatron_lpreg.data import R1_ZERO_TEMPLATE, PromptRecord, encode_prompts, render_prompt

from .tiny_tokenizer import build_tiny_tokenizer

QUESTION = "What is 37 + 48?"
MSG_RECORD = PromptRecord(0, [{"role": "user", "content": QUESTION}], "arith", "85")
STR_RECORD = PromptRecord(1, QUESTION, "arith", "85")
SYS_RECORD = PromptRecord(
    2, [{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTION}], "arith", "85"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_r1_zero():
    text = render_prompt(MSG_RECORD, "r1_zero", None)
    assert text.startswith("A conversation between User and Assistant.")
    assert "<think> </think>" in text
    assert f"User: {QUESTION}\nAssistant: <think>" in text
    assert text.endswith("Assistant: <think>")
    assert text == R1_ZERO_TEMPLATE.format(question=QUESTION)
    # String prompts and message lists give the same text; a system message is not the question.
    assert render_prompt(STR_RECORD, "r1_zero") == text
    assert render_prompt(SYS_RECORD, "r1_zero") == text
    assert "You are terse." not in render_prompt(SYS_RECORD, "r1_zero")


def test_chat_template(tokenizer):
    text = render_prompt(MSG_RECORD, "chat", tokenizer)
    assert text == f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    # A string prompt becomes one user message.
    assert render_prompt(STR_RECORD, "chat", tokenizer) == text
    sys_text = render_prompt(SYS_RECORD, "chat", tokenizer)
    assert sys_text == "<|im_start|>system\nYou are terse.<|im_end|>\n" + text


def test_chat_needs_tokenizer_with_template(tokenizer):
    with pytest.raises(ValueError, match="tokenizer"):
        render_prompt(MSG_RECORD, "chat", None)


def test_raw_template():
    assert render_prompt(STR_RECORD, "raw") == QUESTION
    assert render_prompt(SYS_RECORD, "raw") == f"You are terse.\n{QUESTION}"


def test_unknown_template_and_callable():
    with pytest.raises(ValueError, match="unknown prompt template"):
        render_prompt(MSG_RECORD, "nope")
    assert render_prompt(MSG_RECORD, lambda r, tok: r.question.upper()) == QUESTION.upper()


def test_encode_left_truncation(tokenizer):
    records = [
        PromptRecord(0, "hi", "s", "1"),
        PromptRecord(1, "A much longer question about apples, marbles and boxes " * 3, "s", "2"),
        MSG_RECORD,
    ]
    full, n_full = encode_prompts(records, tokenizer, "chat", max_prompt_len=10_000)
    assert n_full == 0
    for rec, ids in zip(records, full):
        assert ids == tokenizer(render_prompt(rec, "chat", tokenizer), add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in full]
    assert lengths[0] < lengths[2] < lengths[1]

    limit = lengths[2]  # exactly the third prompt's length: it is not truncated
    out, n_truncated = encode_prompts(records, tokenizer, "chat", max_prompt_len=limit)
    assert n_truncated == 1
    assert out[0] == full[0] and out[2] == full[2]
    assert len(out[1]) == limit and out[1] == full[1][-limit:]
    assert out[1] != full[1][:limit]
    # Left truncation keeps the generation cue at the end.
    assert tokenizer.decode(out[1]).endswith("<|im_start|>assistant\n")

    out, n_truncated = encode_prompts(records, tokenizer, "r1_zero", max_prompt_len=5)
    assert n_truncated == 3 and all(len(ids) == 5 for ids in out)
    assert all(tokenizer.decode(ids).endswith("<think>") for ids in out)


def test_encode_edge_cases(tokenizer):
    assert encode_prompts([], tokenizer, "raw", 8) == ([], 0)
    with pytest.raises(ValueError, match="max_prompt_len"):
        encode_prompts([MSG_RECORD], tokenizer, "raw", 0)
