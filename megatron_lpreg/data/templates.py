"""Prompt templates and prompt tokenisation.

Templates:

* ``"r1_zero"`` -- the DeepSeek-R1-Zero style plain-text template used for base models in the
  DAPO / Lp-Reg line of work; the question is the user message content and the prompt ends with
  ``"Assistant: <think>"`` so the model continues inside the reasoning block.
* ``"chat"`` -- the tokenizer's own chat template with the generation prompt appended
  (a string prompt becomes one user message).
* ``"raw"`` -- the prompt string as-is (a message list: its contents joined by newlines).

``encode_prompts`` truncates on the LEFT: the end of a prompt (the question and the generation cue)
matters most to the policy, so an over-long prompt loses its beginning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Union

from .schema import PromptRecord

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process is enclosed within <think> </think> and the answer is "
    "enclosed within <answer> </answer> tags, respectively, i.e., <think> reasoning process here "
    "</think> <answer> answer here </answer>.\nUser: {question}\nAssistant: <think>"
)

TemplateFn = Callable[[PromptRecord, Any], str]
Template = Union[str, TemplateFn]


def _render_r1_zero(record: PromptRecord, tokenizer: Any = None) -> str:
    return R1_ZERO_TEMPLATE.format(question=record.question.strip())


def _render_chat(record: PromptRecord, tokenizer: Any = None) -> str:
    if tokenizer is None:
        raise ValueError("the 'chat' template needs a tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the 'chat' template needs a tokenizer with a chat_template")
    text = tokenizer.apply_chat_template(record.messages(), add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _render_raw(record: PromptRecord, tokenizer: Any = None) -> str:
    if isinstance(record.prompt, str):
        return record.prompt
    return "\n".join(m["content"] for m in record.prompt)


TEMPLATES: dict[str, TemplateFn] = {
    "r1_zero": _render_r1_zero,
    "chat": _render_chat,
    "raw": _render_raw,
}


def render_prompt(record: PromptRecord, template: Template, tokenizer: Any = None) -> str:
    """The prompt text for ``record`` under ``template`` (a name in TEMPLATES or a callable)."""
    if callable(template):
        fn = template
    else:
        try:
            fn = TEMPLATES[template]
        except KeyError:
            raise ValueError(f"unknown prompt template {template!r}; known: {sorted(TEMPLATES)}") from None
    return fn(record, tokenizer)


def encode_prompts(
    records: Iterable[PromptRecord],
    tokenizer: Any,
    template: Template,
    max_prompt_len: int,
    add_special_tokens: bool = False,
) -> tuple[list[list[int]], int]:
    """Render and tokenize prompts, keeping at most the LAST ``max_prompt_len`` tokens of each.

    Returns ``(token_id_lists, n_truncated)``. Special tokens are not added by default: the chat
    template already contains them, and the plain templates are meant for base models.
    """
    if max_prompt_len <= 0:
        raise ValueError(f"max_prompt_len must be positive, got {max_prompt_len}")
    texts = [render_prompt(r, template, tokenizer) for r in records]
    if not texts:
        return [], 0
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    out: list[list[int]] = []
    n_truncated = 0
    for ids in encoded:
        ids = list(ids)
        if len(ids) > max_prompt_len:
            ids = ids[-max_prompt_len:]
            n_truncated += 1
        out.append(ids)
    return out, n_truncated
