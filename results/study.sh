#!/usr/bin/env bash
# The reproduction study of results/README.md's protocol (fixed before it ran):
#   1. five seeds of every row of run.sh (the embedded default with the RL budget of config/study.py),
#      one run folder per seed, then one report over all of them on every test problem (paired
#      bootstrap intervals), copied here with its JSON and figures;
#   2. data efficiency: vanilla SFT, and EI-SFT then EXGRPO, on 10% and 25% of the training
#      questions, seeds 1-3 (100% is step 1's rows), and the report again with them;
#   3. run.sh's linear probes on every seed, and the report again.
# Every training runs on one core, two at a time from one queue (run.sh's schedule leaves a core idle
# behind the slow rows). An RL row waits for the EI-SFT student it starts from; the queue is
# ordered so that it rarely has to. Every training resumes where it stopped and a finished one is
# skipped, so a killed study restarts with the same command. Step 1 takes about 70 minutes of
# training and 15 of evaluation on 2 cores, step 2 about 50 more, step 3 about 10.
set -euo pipefail
cd "$(dirname "$0")/.."
export out=${1:-out/study} configs="config/cpu_tiny.py config/study.py"
for seed in 1 2 3 4 5; do
    python invert.py $configs --out_dir=$out/seed$seed --n_examples=0 > /dev/null 2>&1  # the same data for every seed
    mkdir -p $out/seed$seed/ckpt && rm -f $out/seed$seed/ckpt/*.done $out/seed$seed/ckpt/*.failed
done

source results/queue.sh  # job and queue: the trainings, two at a time
rows() {  # the four RL rows that start from a seed's EI-SFT student (the same flags as run.sh)
    local s=$1 init=--init=$out/seed$1/ckpt/sft_ei.pt
    echo "$s rl_exgrpo_plain sft_ei --stage=rl $init --algo=exgrpo --aux_coef=0 --dsu_bonus=False"
    echo "$s rl_exgrpo_nobonus sft_ei --stage=rl $init --algo=exgrpo --dsu_bonus=False"
    echo "$s rl_exgrpo sft_ei --stage=rl $init --algo=exgrpo"
    echo "$s rl_grpo sft_ei --stage=rl $init --algo=grpo"
}
report() {  # every test problem; the EI probes of the first 60 test_id problems (the protocol's metric
            # is test accuracy; all 2280 probes of every checkpoint would double the evaluation)
    python evaluate.py --runs="$(ls -d "$out"/seed* | paste -sd,)" --out_dir="$out" --max_problems=0 \
        --probe_problems=60 --threads=2 --reuse=True
    cp "$out"/report/report.md "$out"/report/*.png results/
    python - "$out" <<'PY'
import json, sys
saved = json.load(open(f"{sys.argv[1]}/report/results.json"))
json.dump({"command": "bash results/study.sh", **saved}, open("results/study.json", "w"), indent=1)
PY
    echo "wrote results/report.md, results/study.json and the figures"
}

# 1. the seven rows on five seeds: a seed's SFT rows, then the previous seed's RL rows (its EI-SFT
#    student is ready by then), the cold starts last (they need no student and are the slowest)
{
    for seed in 1 2 3 4 5; do
        echo "$seed sft_ei - --stage=sft --data=ei"
        echo "$seed sft_qa - --stage=sft --data=qa"
        if [ $seed -gt 1 ]; then rows $((seed - 1)); fi
    done
    rows 5
    for seed in 1 2 3 4 5; do echo "$seed rl_cold - --stage=rl --algo=exgrpo --difficulty=False"; done
} | queue
report

# 2. data efficiency: every SFT row first, then the RL rows
{
    for stage in sft rl; do
        for seed in 1 2 3; do
            for f in 0.1 0.25; do
                tag=f$(python -c "print(round($f * 100))")
                if [ $stage = sft ]; then
                    echo "$seed sft_ei_$tag - --stage=sft --data=ei --data_fraction=$f"
                    echo "$seed sft_qa_$tag - --stage=sft --data=qa --data_fraction=$f"
                else
                    echo "$seed rl_exgrpo_$tag sft_ei_$tag --stage=rl --init=$out/seed$seed/ckpt/sft_ei_$tag.pt" \
                        "--algo=exgrpo --data_fraction=$f"
                fi
            done
        done
    done
} | queue
report

# 3. run.sh's linear probes on every seed (added after the results above, not in the protocol: does the
#    probe finding hold across seeds?), two at a time, then the report again with their means
probes() {  # run folder, seed
    local run=$1 ckpt=$1/ckpt
    python probe.py --checkpoints=untrained=init:$ckpt/sft_qa.pt,vanilla=$ckpt/sft_qa.pt,ei_sft=$ckpt/sft_ei.pt,exgrpo=$ckpt/rl_exgrpo.pt \
        --data=$run/data --world=coin --target=state --positions=event --out_dir=$run/probe --threads=1 --seed=$2 \
        > $run/probe.log 2>&1 || { echo "study.sh: probe.py failed, see $run/probe.log" >&2; exit 1; }
}
export -f probes
for seed in 1 2 3 4 5; do  # a seed already probed is skipped
    [ -f $out/seed$seed/probe/probe_coin_state_event.json ] || echo "$out/seed$seed $seed"
done | xargs -r -P 2 -L 1 bash -c 'probes "$@"' _ || exit 1
report
