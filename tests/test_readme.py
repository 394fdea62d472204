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


def test_verl_metric_table_names_only_metrics_we_log():
    """docs/verl_metrics.md's right-hand names are rows of the README's metrics table."""
    table = README[README.index("| key | meaning |"):]
    ours = set(re.findall(r"`([a-z_]+/[a-z_@<>/]+)`", table.split("\n## ")[0]))
    doc = (ROOT / "docs" / "verl_metrics.md").read_text(encoding="utf-8")
    rows = [line.split(" | ") for line in doc.splitlines() if line.startswith("| `")]
    assert len(rows) > 15
    for row in rows:
        for name in re.findall(r"`([^`]+)`", row[1]):
            assert name in ours, name
