"""Reading the markdown tables the commands write (comparison.md)."""


def table_row(text: str, label: str) -> list[str]:
    """The cells of the first row of ``text`` whose first cell is ``label``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row for {label!r} in:\n{text}")
