"""The README's two commands: the second is exactly what .ci/run runs; relative links resolve."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _bash_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S)]


def test_first_command_runs_the_demo_and_second_is_ci():
    main, tests = _bash_blocks()[:2]
    assert main.endswith(".venv/bin/megatron-lpreg train") and "-c constraints/cpu.txt" in main
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert tests == ci


def test_relative_links_exist():
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README):
        assert (ROOT / target).exists(), target
