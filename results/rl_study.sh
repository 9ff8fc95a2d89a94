#!/usr/bin/env bash
# The RL study of results/README.md's protocol (pre-registered 2026-12-03, "The RL study"): at 10% of the
# training questions, per seed vanilla SFT, EI-SFT, and EXGRPO with and without the DSU bonus from
# that seed's EI-SFT student (180 steps of 8 questions), then every test problem (1000 per split)
# scored and the seed's small results committed under results/rl_study/seed<N>/ (results.json with
# the per-problem answers, and the training logs; never checkpoints). A seed already committed is
# skipped, so the study runs in chunks across sittings and machines; the report is drawn from
# every committed seed:
#
#   bash results/rl_study.sh                 # seeds 1-20 in order, skipping the committed ones, until
#                                            # both MDEs are at most 2 points (from 5 seeds on)
#   SEEDS="4 5" bash results/rl_study.sh     # only these
#
# A seed takes about 50 minutes on 2 cores (two trainings at a time, one core each; measured on seeds 1-2).
set -euo pipefail
cd "$(dirname "$0")/.."
export out=out/rl_study configs="config/cpu_tiny.py config/study.py config/rl_study.py"
source results/queue.sh
for seed in ${SEEDS:-$(seq 1 20)}; do
    done_dir=results/rl_study/seed$seed
    if [ -f $done_dir/results.json ]; then echo "seed $seed: committed, skipped"; continue; fi
    python invert.py $configs --out_dir=$out/seed$seed --n_examples=0 > /dev/null 2>&1  # the same data for every seed
    mkdir -p $out/seed$seed/ckpt && rm -f $out/seed$seed/ckpt/*.failed
    init=--init=$out/seed$seed/ckpt/sft_ei.pt
    printf '%s\n' "$seed sft_ei - --stage=sft --data=ei" "$seed sft_qa - --stage=sft --data=qa" \
        "$seed rl_exgrpo_nobonus sft_ei --stage=rl $init --algo=exgrpo --dsu_bonus=False --eval_interval=30" \
        "$seed rl_exgrpo sft_ei --stage=rl $init --algo=exgrpo --eval_interval=30" | queue
    # every test problem; the EI probes of the first 60 test_id problems
    python evaluate.py --out_dir=$out/seed$seed --max_problems=0 --probe_problems=60 --threads=2 --reuse=True \
        > $out/seed$seed/evaluate.log 2>&1
    mkdir -p $done_dir/logs
    cp $out/seed$seed/logs/*.jsonl $done_dir/logs/
    cp $out/seed$seed/report/results.json $done_dir/results.json
    git add $done_dir && git commit -q -m "results/rl_study: seed $seed (bash results/rl_study.sh)" -- $done_dir
    echo "$(date +%T) seed $seed committed"
    # the protocol's stopping rule, from the fifth committed seed on: both MDEs at most 2 points (it
    # reads the variances only, never the differences)
    python evaluate.py --from_results="$(ls -d results/rl_study/seed* | paste -sd,)" --out_dir=results/rl_study \
        > /dev/null
    if python - <<'PY'
import json, sys
power = json.load(open("results/rl_study/report/results.json"))["power"]
rows = [power.get(k, {}) for k in ("rl_exgrpo - sft_ei", "rl_exgrpo - rl_exgrpo_nobonus")]
done = all(r.get("seeds", 0) >= 5 and r.get("mde") is not None and r["mde"] <= 2.0 for r in rows)
print("MDE " + ", ".join(f"{r.get('mde', float('nan')):.2f}" for r in rows) + (": the study is complete" if done else ""))
sys.exit(0 if done else 1)
PY
    then break; fi
done
python evaluate.py --from_results="$(ls -d results/rl_study/seed* | paste -sd,)" --out_dir=results/rl_study
