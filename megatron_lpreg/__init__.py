"""megatron-lpreg: Megatron-core tensor-parallel RLVR training with the Lp-Reg regulariser."""

import os as _os
import warnings as _warnings

__version__ = "0.1.0"

# megatron-core's import-time notices about optional fused kernels and CUDA tuning: ~8 lines per
# process (the commands, every rank, the checkpoint tools) that say nothing a user can act on, the
# fallbacks being the tested paths. Installed here, before any megatron import of ours.
# MEGATRON_LPREG_ALL_WARNINGS=1 shows them.
QUIET_WARNINGS = (
    r"Apex is not installed",
    r"Transformer Engine and Apex are not installed",
    r"When using async grad allreduce it is recommended",
    r"full scope is deprecated",
    r"MLP requires ffn_hidden_size",
)
if not _os.environ.get("MEGATRON_LPREG_ALL_WARNINGS"):
    for _pattern in QUIET_WARNINGS:
        _warnings.filterwarnings("ignore", message=_pattern)
