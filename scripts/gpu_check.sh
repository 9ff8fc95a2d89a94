#!/usr/bin/env bash
# The GPU check (README, "On a GPU"): the GPU preset's pipeline top to bottom with reduced steps,
# timed, into results/gpu_check.json. Other arguments (config files, --key=value) go to
# scripts/gpu_check.py after these.
#
#   bash scripts/gpu_check.sh                  # one GPU, under 10 minutes (downloads GPT-2 once)
#   bash scripts/gpu_check.sh --device=cpu     # dry run at a tiny shape: out/gpu_check/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
configs="config/gpu_gpt2.py config/gpu_check.py"
for arg in "$@"; do
    if [ "$arg" = "--device=cpu" ]; then configs="$configs config/gpu_check_cpu.py"; fi
done
exec python scripts/gpu_check.py $configs "$@"
