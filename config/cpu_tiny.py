# The embedded default: a tiny GPT-2-shaped student trained from scratch on 2 CPU cores,
# oracle teacher, compact vocabulary. Every stage reads the keys it knows and ignores the rest.
out_dir = "out/default"
device = "cpu"
threads = 2
init = "scratch"
n_layer, n_head, n_embd, block_size = 4, 4, 128, 512
# SFT
batch_size = 32
lr = 3e-3
max_iters = 1500
warmup_iters = 100
eval_interval = 500
# RL
rl_steps = 30
rl_lr = 2e-5
group_size = 8
k = 3
max_new_tokens = 48
