#!/usr/bin/env bash
# The reproduction study behind the README's results, on the CPU preset (config/cpu_tiny.py):
#   1. three seeds of every method row (run.sh: vanilla SFT, EI-SFT, SFT+GRPO, EXGRPO without the
#      DSU bonus, full EXGRPO, RL cold start), one run folder per seed;
#   2. data efficiency on seed 1: vanilla SFT against EI-SFT + EXGRPO with 10% and 25% of the
#      training questions (100% is the seed-1 row of step 1);
#   3. one report over the three folders, copied here with its numbers and figures.
# Seed 1 is exactly `bash run.sh` (same config, same seed). The numbers in results/ skipped
# recomputing it:  mkdir -p out/study && cp -r out/default out/study/seed1 && SEEDS="2 3" bash results/study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/study}
seeds=${SEEDS:-"1 2 3"}
bash run.sh --seeds "$seeds" --out "$out"
run=$out/seed1
pids=""
for fraction in 0.1 0.25; do
    tag=f$(python -c "print(round($fraction * 100))")
    train="python distill_rl.py config/cpu_tiny.py --out_dir=$run --seed=1 --data_fraction=$fraction"
    $train --stage=sft --data=qa --name=sft_qa_$tag > $run/train_qa_$tag.log 2>&1 &
    pids="$pids $!"
    ( $train --stage=sft --data=ei --name=sft_ei_$tag
      $train --stage=rl --init=$run/ckpt/sft_ei_$tag.pt --algo=exgrpo --name=rl_exgrpo_$tag ) > $run/train_ei_$tag.log 2>&1 &
    pids="$pids $!"
done
for p in $pids; do wait $p || { echo "study.sh: a data-fraction run failed, see $run/train_*.log" >&2; exit 1; }; done
runs=$(ls -d "$out"/seed* | paste -sd,)  # seed1 included when copied from out/default
python evaluate.py --runs="$runs" --out_dir="$out" --max_problems=60 --reuse=True --threads=2
cp "$out"/report/report.md "$out"/report/*.png "$out"/seed1/probe/*.png results/
sed -i 's#(../seed1/probe/\(probe_[a-z_]*\.png\))#(\1)#' results/report.md  # figures sit beside it here
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
saved = json.load(open(f"{out}/report/results.json"))
commands = ["bash results/study.sh  (seed 1 copied from `bash run.sh`, see the header of results/study.sh)"]
json.dump({"commands": commands, **saved}, open("results/study.json", "w"), indent=1)
PY
echo "wrote results/report.md, results/study.json and the figures"
