# scripts/gpu_check.sh --device=cpu: a dry run of the GPU check on a CPU, a step or two of
# everything.
# Tiny shapes from scratch; with --init=<a GPT-2 folder> the same steps at that model's shapes (the
# full-shape smoke test: GPT-2 124M with random weights, k = 5 probe turns). Not a result.
device = "cpu"
threads = 1
init = "scratch"
n_layer, n_head, n_embd, block_size = 2, 2, 32, 1024
n_train, n_val, n_test, n_ood = 8, 2, 6, 2
max_iters = 2
batch_size = 2
grad_accum = 1
warmup_iters = 1
eval_problems = 1
rl_steps = 1
rl_batch_size = 1
group_size = 2
rl_warmup = 1
rl_candidates = 1
tau_hard = 0
max_new_tokens = 4
micro_batch = 4
probe_args = (
    "--max_problems=6 --iters=20 --controls=1 --intervene_layers=1 --alphas=0,4 "
    "--intervene_problems=2 --max_new_tokens=4 --threads=1"
)
evaluate_args = "--max_problems=1 --worlds=coin --max_new_tokens=4 --threads=1"
