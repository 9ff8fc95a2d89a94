#!/usr/bin/env bash
# The main job: every stage of the method top to bottom on the embedded default (a tiny student
# trained from scratch on CPU, the oracle teacher), into one run folder per seed, then one report.
#
#   bash run.sh                      # one seed into out/default            (measured time: README.md)
#   bash run.sh --quick              # a one-minute smoke run into out/quick
#   bash run.sh --seeds "1 2 3"      # one run folder per seed, report over all of them
#   bash run.sh --resume             # continue (or skip) the trainings an earlier run left in the folder
#   bash run.sh --val                # score the validation copies, not the test splits (to choose settings)
#   bash run.sh --preset config/gpu_gpt2.py   # GPT-2 124M on one GPU (docs/gpu.md)
set -euo pipefail
cd "$(dirname "$0")"

preset=config/cpu_tiny.py
seeds="1"
out=""
quick=""
resume=""
splits=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=config/quick.py ;;
        --resume) resume=--resume=True ;;
        --val) splits=--splits=val,val_ood_long,val_ood_reverse,val_ood_names ;;
        --seeds) seeds="$2"; shift ;;
        --preset) preset="$2"; shift ;;
        --out) out="$2"; shift ;;
        *) echo "run.sh: unknown argument $1 (options: --quick, --seeds \"1 2 3\", --preset FILE, --out DIR, --resume, --val)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$out" ]; then
    out=$([ -n "$quick" ] && echo out/quick || python -c "exec(open('$preset').read()); print(out_dir)")
fi
configs="$preset $quick"
start=$(date +%s)
trap 'kill $(jobs -p) 2> /dev/null || true' EXIT  # an interrupted or failed run leaves no training behind
stamp() { echo "== [$(( $(date +%s) - start )) s] $*"; }

runs=""
probes=""
for seed in $seeds; do
    run=$out
    [ "$(echo $seeds | wc -w)" -gt 1 ] && run=$out/seed$seed
    runs="$runs${runs:+,}$run"
    stamp "seed $seed -> $run"
    # stage 1: problems, teacher rationales, EI probes, consistency filter (the data is the same for every seed)
    python invert.py $configs --out_dir=$run --n_examples=0
    # stages 2 and 3 on two cores, one training each (every RL row gets the same steps, questions
    # per step and trained rollouts per question: docs/design.md, "The rows"):
    #   core 1: EI-SFT (the warm start and frozen reference of every RL row but the cold start),
    #           then SFT + dialogue RL, then EXGRPO
    #   core 2: vanilla SFT, then the RL cold start (it needs no student), then, once EI-SFT is
    #           done, SFT + dialogue RL + aux, then one-turn GRPO
    train="python distill_rl.py $configs --out_dir=$run --seed=$seed $resume"
    sft=$run/ckpt/sft_ei.pt
    rl="$train --stage=rl --init=$sft"
    failed() { echo "run.sh: a training failed, see $run/train.log" >&2; exit 1; }  # (the trap stops the other)
    stamp "training: follow with tail -f $run/train.log"
    : > $run/train.log
    { $train --stage=sft --data=qa && $train --stage=rl --difficulty=False --name=rl_cold; } \
        >> $run/train.log 2>&1 & core2=$!
    $train --stage=sft --data=ei >> $run/train.log 2>&1 || failed
    { $rl --aux_coef=0 --dsu_bonus=False --name=rl_exgrpo_plain && $rl --name=rl_exgrpo; } \
        >> $run/train.log 2>&1 & core1=$!
    wait $core2 || failed
    { $rl --dsu_bonus=False --name=rl_exgrpo_nobonus && $rl --algo=grpo --name=rl_grpo; } \
        >> $run/train.log 2>&1 || failed
    wait $core1 || failed
    stamp "trained: per-step metrics in $run/logs"
    # linear probes on the students' hidden states (coin, the headline world), beside the evaluation
    # below, sized to take no longer than it (3 control tasks, 30 problems edited)
    # (untrained = the same architecture with fresh weights: what a probe reads without any training)
    ckpts=untrained=init:$run/ckpt/sft_qa.pt,vanilla=$run/ckpt/sft_qa.pt,ei_sft=$run/ckpt/sft_ei.pt,exgrpo=$run/ckpt/rl_exgrpo.pt
    python probe.py --checkpoints=$ckpts --data=$run/data --world=coin --target=state --positions=event \
        --out_dir=$run/probe --threads=1 --seed=$seed \
        $( [ -n "$quick" ] && echo "--max_problems=40 --iters=100 --controls=1 --intervene_problems=8 --alphas=0,4" \
            || echo "--controls=3 --intervene_problems=30" ) \
        > $run/probe.log 2>&1 &
    probes="$probes $!"
done
# the committed multi-seed studies, set beside this run's one-seed differences in its report
studies=results/study.json,results/rl_study/report/results.json
stamp "evaluate (linear probes alongside, log: probe.log in each run folder)"
# what both evaluate.py calls score: the splits, and the problems of each
scored="$splits --max_problems=$( [ -n "$quick" ] && echo 8 || echo 60 )"
python evaluate.py --runs=$runs --out_dir=$out --threads=1 $scored
for p in $probes; do wait $p || { echo "run.sh: probe.py failed, see probe.log" >&2; exit 1; }; done
python evaluate.py --runs=$runs --out_dir=$out --reuse=True $scored --studies=$studies > /dev/null
# one RL step of EXGRPO seen up close (the last seed's EI-SFT student): both scenarios' dialogues,
# rewards, P_full and P_partial, the DSU bonus and the advantages with and without it
{ echo; echo "## One EXGRPO step, seen up close (scripts/show_rl_step.py, seed $seed)"; echo
  echo '```'
  python scripts/show_rl_step.py $configs --out_dir=$run --init=$sft --seed=$seed --questions=1 --rollouts=2
  echo '```'; } >> $out/report/report.md
stamp "done: $out/report/report.md"
