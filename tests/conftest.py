import os

# Tests are single-threaded per process: CI has 2 cores and multi-rank tests spawn 2 processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random policy directory and generated prompt files (tests/grpo/tiny_run.py), per module."""
    from tests.grpo.tiny_run import make_data, make_policy_dir

    root = tmp_path_factory.mktemp("assets")
    return str(make_policy_dir(root / "policy")), make_data(root / "data")
