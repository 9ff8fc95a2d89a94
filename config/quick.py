# run.sh --quick: the same pipeline, tiny everything, for a one-minute smoke test. Not a result.
out_dir = "out/quick"
worlds = "coin"
n_train, n_val, n_test, n_ood = 64, 16, 16, 16
data_fraction = 1.0  # 10% of 64 questions would leave the RL stage too few
n_layer, n_head, n_embd = 2, 2, 32
max_iters = 30
eval_interval = 1000
eval_problems = 16
rl_steps = 2
batch_size = 8
rl_batch_size = 4
group_size = 2
k = 2
rl_candidates = 32
difficulty = False
max_new_tokens = 32
