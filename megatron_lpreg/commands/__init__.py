"""The subcommands of ``megatron-lpreg``, one module each with ``add_arguments(parser)`` and
``run(args) -> int``; ``megatron_lpreg/cli.py`` only dispatches to them. The other modules here serve
the commands: launch (start the ranks), preflight (check a run before it starts), report (the text
of a run's results).
"""

from megatron_lpreg.checkpointing import CheckpointError
from megatron_lpreg.config import ConfigError
from megatron_lpreg.data import DataError
from megatron_lpreg.model import ModelConfigError
from megatron_lpreg.parallel import ParallelConfigError
from megatron_lpreg.runs import RunError
from megatron_lpreg.weights.hf_files import HFCheckpointError

# A problem of the user's input: one line, exit status 2 (no traceback).
USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelConfigError, ParallelConfigError, HFCheckpointError,
               RunError)
