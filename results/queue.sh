# The training queue of the study scripts (sourced): jobs "seed name needs flags..." on stdin, two at
# a time, each on one core. A job whose `needs` is a checkpoint name waits for it; <name>.done or
# <name>.failed beside the checkpoint says how a job ended. Every training resumes where it stopped
# and a finished one is skipped, so a killed study restarts with the same command. Needs $out (one
# folder seed<N> per seed) and $configs exported.
job() {
    local seed=$1 name=$2 needs=$3 ckpt=$out/seed$1/ckpt
    shift 3
    [ -f $ckpt/$name.done ] && return 0  # finished earlier in this study folder
    until [ "$needs" = - ] || [ -f $ckpt/$needs.done ]; do
        [ -f $ckpt/$needs.failed ] && { touch $ckpt/$name.failed; exit 1; }
        sleep 5
    done
    echo "$(date +%T) seed $seed $name"
    if python distill_rl.py $configs --out_dir=$out/seed$seed --seed=$seed --resume=True --name=$name "$@" \
            >> $out/seed$seed/train.log 2>&1; then
        touch $ckpt/$name.done
    else
        touch $ckpt/$name.failed
        echo "seed $seed $name failed, see $out/seed$seed/train.log" >&2
        exit 1
    fi
}
export -f job
queue() {
    xargs -P 2 -L 1 bash -c 'job "$@"' _ > $out/queue.log 2>&1 || { echo "a training failed, see $out/queue.log" >&2; exit 1; }
}
