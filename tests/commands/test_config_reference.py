"""docs/configuration.md is generated from the dataclasses; it must match them and describe every field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_lpreg.commands.config_reference import _SECTIONS, field_comments, reference

ROOT = Path(__file__).resolve().parents[2]


def test_committed_reference_is_current():
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == reference(), "regenerate: megatron-lpreg config-reference > docs/configuration.md"


def test_every_field_has_a_description():
    for cls in _SECTIONS.values():
        comments = field_comments(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)]
        assert not missing, f"{cls.__name__}: fields without a comment: {missing}"


def test_comments_come_from_the_line_or_the_block_above():
    @dataclasses.dataclass
    class Example:
        # The block above
        # spans two lines.
        a: int = 1
        b: str = "x"  # trailing wins
        c: float = 0.5

    comments = field_comments(Example)
    assert comments == {"a": "The block above spans two lines.", "b": "trailing wins", "c": ""}


def test_reference_lists_every_key_and_choice():
    text = reference()
    for key in ("`run_dir`", "`model.recompute`", "`grpo.micro_batch_tokens`", "`loss.rho`", "`loss.percentile_scope`",
                "`validation.samples`", "`checkpoint.resume`", "`logging.wandb_mode`"):
        assert f"| {key} |" in text
    assert "One of: `none`, `full`" in text and "| `gspo` |" in text
