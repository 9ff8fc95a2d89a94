#!/usr/bin/env bash
# The reproduction study of the README's protocol ("Protocol of the study", fixed before it runs):
#   1. five seeds of every row of run.sh (the embedded default), one run folder per seed;
#   2. data efficiency: vanilla SFT, and EI-SFT then EXGRPO, on 10% and 25% of the training
#      questions, seeds 1-3 (100% is step 1's rows);
#   3. one report over every folder on every test problem (paired bootstrap intervals), copied
#      here with its JSON and figures.
# About 2.5 hours on 2 cores (the RL budget of config/study.py). Every training resumes where it stopped, so a killed study restarts
# with the same command.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/study}
bash run.sh --preset "config/cpu_tiny.py config/study.py" --seeds "1 2 3 4 5" --out "$out" --resume
pids=""
for seed in 1 2 3; do
    run=$out/seed$seed
    for fraction in 0.1 0.25; do
        tag=f$(python -c "print(round($fraction * 100))")
        train="python distill_rl.py config/cpu_tiny.py config/study.py --out_dir=$run --seed=$seed --data_fraction=$fraction --resume=True"
        ( $train --stage=sft --data=qa --name=sft_qa_$tag
          $train --stage=sft --data=ei --name=sft_ei_$tag
          $train --stage=rl --init=$run/ckpt/sft_ei_$tag.pt --algo=exgrpo --name=rl_exgrpo_$tag
        ) > $run/train_$tag.log 2>&1 &
        pids="$pids $!"
    done
    for p in $pids; do wait $p || { echo "study.sh: a data-fraction run failed, see $run/train_*.log" >&2; exit 1; }; done
    pids=""
done
runs=$(ls -d "$out"/seed* | paste -sd,)
python evaluate.py --runs="$runs" --out_dir="$out" --max_problems=0 --threads=2
cp "$out"/report/report.md "$out"/report/*.png "$out"/seed1/probe/*.png results/
sed -i 's#(../seed1/probe/\(probe_[a-z_]*\.png\))#(\1)#' results/report.md  # figures sit beside it here
python - "$out" <<'PY'
import json, sys
saved = json.load(open(f"{sys.argv[1]}/report/results.json"))
json.dump({"command": "bash results/study.sh", **saved}, open("results/study.json", "w"), indent=1)
PY
echo "wrote results/report.md, results/study.json and the figures"
