"""HF <-> Megatron checkpoint converters: ``python -m checkpoint_tools.hf_to_megatron --help`` and
``python -m checkpoint_tools.megatron_to_hf --help``. Both stream one layer at a time through the
weight table of ``megatron_lpreg.weights``."""
