"""megatron-lpreg: Megatron-core tensor-parallel RLVR training with the Lp-Reg regulariser."""

__version__ = "0.1.0"
