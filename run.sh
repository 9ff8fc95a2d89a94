#!/usr/bin/env bash
# The main job: every stage of the method top to bottom on the embedded default (a tiny student
# trained from scratch on CPU, the oracle teacher), into one run folder per seed, then one report.
#
#   bash run.sh                      # one seed into out/default            (measured time: README.md)
#   bash run.sh --quick              # a one-minute smoke run into out/quick
#   bash run.sh --seeds "1 2 3"      # one run folder per seed, report over all of them
#   bash run.sh --resume             # continue (or skip) the trainings an earlier run left in the folder
#   bash run.sh --preset config/gpu_gpt2.py   # GPT-2 124M on one GPU (docs/gpu.md)
set -euo pipefail
cd "$(dirname "$0")"

preset=config/cpu_tiny.py
seeds="1"
out=""
quick=""
resume=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=config/quick.py ;;
        --resume) resume=--resume=True ;;
        --seeds) seeds="$2"; shift ;;
        --preset) preset="$2"; shift ;;
        --out) out="$2"; shift ;;
        *) echo "run.sh: unknown argument $1 (options: --quick, --seeds \"1 2 3\", --preset FILE, --out DIR, --resume)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$out" ]; then
    out=$([ -n "$quick" ] && echo out/quick || python -c "exec(open('$preset').read()); print(out_dir)")
fi
configs="$preset $quick"
start=$(date +%s)
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
    # stage 2, one core each: EI-SFT (the warm start and frozen reference of every RL row but the
    # cold start) on one; vanilla SFT, then the RL cold start (it needs no student) on the other
    train="python distill_rl.py $configs --out_dir=$run --seed=$seed $resume"
    sft=$run/ckpt/sft_ei.pt
    stamp "training: follow with tail -f $run/train.log"
    ( { $train --stage=sft --data=qa && $train --stage=rl --algo=exgrpo --difficulty=False --name=rl_cold; } & other=$!
      $train --stage=sft --data=ei && wait $other ) > $run/train.log 2>&1 \
        || { echo "run.sh: SFT or the cold start failed, see $run/train.log" >&2; exit 1; }
    # stage 3, the rest of the paper's Table 3 rows plus one-turn GRPO, two at a time; every RL row
    # gets the same steps, questions per step and trained rollouts per question (docs/design.md, "The rows")
    printf '%s\n' \
        "--init=$sft --algo=exgrpo --aux_coef=0 --dsu_bonus=False --name=rl_exgrpo_plain" \
        "--init=$sft --algo=exgrpo --dsu_bonus=False --name=rl_exgrpo_nobonus" \
        "--init=$sft --algo=exgrpo --name=rl_exgrpo" \
        "--init=$sft --algo=grpo --name=rl_grpo" \
        | xargs -P 2 -I {} sh -c "$train --stage=rl {}" >> $run/train.log 2>&1 \
        || { echo "run.sh: RL failed, see $run/train.log" >&2; exit 1; }
    stamp "trained: per-step metrics in $run/logs"
    # linear probes on the students' hidden states (coin, the headline world), beside the evaluation below
    # (untrained = the same architecture with fresh weights: what a probe reads without any training)
    ckpts=untrained=init:$run/ckpt/sft_qa.pt,vanilla=$run/ckpt/sft_qa.pt,ei_sft=$run/ckpt/sft_ei.pt,exgrpo=$run/ckpt/rl_exgrpo.pt
    python probe.py --checkpoints=$ckpts --data=$run/data --world=coin --target=state --positions=event \
        --out_dir=$run/probe --threads=1 --seed=$seed \
        $( [ -n "$quick" ] && echo "--max_problems=40 --iters=100 --controls=1 --intervene_problems=8 --alphas=0,4" ) \
        > $run/probe.log 2>&1 &
    probes="$probes $!"
done
stamp "evaluate (linear probes alongside, log: probe.log in each run folder)"
python evaluate.py --runs=$runs --out_dir=$out --threads=1 $( [ -n "$quick" ] && echo "--max_problems=8" || echo "--max_problems=60" )
for p in $probes; do wait $p || { echo "run.sh: probe.py failed, see probe.log" >&2; exit 1; }; done
python evaluate.py --runs=$runs --out_dir=$out --reuse=True $( [ -n "$quick" ] && echo "--max_problems=8" || echo "--max_problems=60" ) > /dev/null
# one RL step of EXGRPO seen up close (the last seed's EI-SFT student): both scenarios' dialogues,
# rewards, P_full and P_partial, the DSU bonus and the advantages with and without it
{ echo; echo "## One EXGRPO step, seen up close (scripts/show_rl_step.py, seed $seed)"; echo
  echo '```'
  python scripts/show_rl_step.py $configs --out_dir=$run --init=$sft --seed=$seed --questions=1 --rollouts=2
  echo '```'; } >> $out/report/report.md
stamp "done: $out/report/report.md"
