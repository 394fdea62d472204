"""Prompt datasets for the RL trainer: verl-schema JSONL/Parquet loading, templates, sampling, demo data."""

from .dataset import PromptDataset, load_prompt_dataset
from .generate import evaluate_expression, generate_arithmetic_problems, write_arithmetic_dataset
from .sampler import PromptSampler, epoch_order
from .schema import DataError, DataFields, PromptRecord
from .templates import R1_ZERO_TEMPLATE, TEMPLATES, encode_prompts, render_prompt

__all__ = [
    "DataError",
    "DataFields",
    "PromptDataset",
    "PromptRecord",
    "PromptSampler",
    "R1_ZERO_TEMPLATE",
    "TEMPLATES",
    "encode_prompts",
    "epoch_order",
    "evaluate_expression",
    "generate_arithmetic_problems",
    "load_prompt_dataset",
    "render_prompt",
    "write_arithmetic_dataset",
]
