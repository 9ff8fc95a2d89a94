# scripts/gpu_check.sh on one GPU: the GPU preset's pipeline with reduced steps and data, in under
# 10 minutes (docs/gpu.md). Applied after config/gpu_gpt2.py.
out_dir = "out/gpu_check"
n_train, n_val, n_test, n_ood = 500, 100, 100, 50
max_iters = 300
eval_interval = 300
eval_problems = 100
rl_steps = 20
rl_candidates = 128
tau_hard = 0  # Eq. 2 keeps every question the short-trained student does not fully answer
probe_args = "--max_problems=200 --iters=200 --controls=1 --intervene_problems=20"
evaluate_args = "--max_problems=20"
