#!/usr/bin/env bash
# Every GPU check of DAM in one run, from a plain copy of the working tree: no pip install, no
# network (torch, triton, transformers, safetensors and scikit-learn must be importable).
#
#   benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS]   # on a GPU machine (default DIR: $OUT)
#   benchmarks/gpu_check.sh --smoke --out DIR                # tiny sizes on the CPU (CI)
#
# What it measures and writes: benchmarks/gpu_check.py's docstring.
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT
# the import package dam.* from the source folders (pyproject.toml's [tool.setuptools.package-dir])
mkdir -p "$shim/dam"
for pair in compiler:dam_compile profiler:profiler runtime:runtime kernels:kernels cli:cli; do
  ln -s "$root/${pair#*:}" "$shim/dam/${pair%%:*}"
done
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
for arg in "$@"; do
  if [ "$arg" = "--smoke" ]; then export TRITON_INTERPRET=1; fi
done
"${PYTHON:-python3}" "$root/benchmarks/gpu_check.py" "$@"
