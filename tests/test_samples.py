"""samples.jsonl (megatron_lpreg/samples.py): its size bound and a resumed run's view of it."""

from __future__ import annotations

import json

from megatron_lpreg.samples import SAMPLES_FILE, SampleFile


def _rows(step, n=3):
    return [{"step": step, "kind": "train", "response": "x" * 100} for _ in range(n)]


def test_the_file_rotates_past_its_bound(tmp_path):
    f = SampleFile(tmp_path, max_bytes=1000, start_step=0)
    for step in range(1, 4):
        f.write(_rows(step))  # ~400 bytes a step
    older = tmp_path / (SAMPLES_FILE + ".1")
    assert [json.loads(x)["step"] for x in older.read_text().splitlines()] == [1] * 3 + [2] * 3 + [3] * 3
    assert not (tmp_path / SAMPLES_FILE).exists()
    f.write(_rows(4))
    assert (tmp_path / SAMPLES_FILE).stat().st_size < 1000 and older.stat().st_size < 2000


def test_a_resumed_run_drops_the_steps_after_its_checkpoint(tmp_path):
    f = SampleFile(tmp_path, max_bytes=10**6, start_step=0)
    for step in range(1, 5):
        f.write(_rows(step, 1))
    with open(tmp_path / SAMPLES_FILE, "a") as torn:
        torn.write('{"step": 5, "kin')
    SampleFile(tmp_path, max_bytes=10**6, start_step=2)
    assert [json.loads(x)["step"] for x in (tmp_path / SAMPLES_FILE).read_text().splitlines()] == [1, 2]
    SampleFile(tmp_path, max_bytes=10**6, start_step=2, enabled=False).write(_rows(9))  # not rank 0
    assert len((tmp_path / SAMPLES_FILE).read_text().splitlines()) == 2
