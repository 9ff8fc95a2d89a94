# One GPU, GPT-2 124M student initialised from OpenAI's weights (downloaded once to
# ~/.cache/exgrpo/gpt2), full GPT-2 vocabulary, the paper's k = 5 probes per dialogue.
out_dir = "out/gpu_gpt2"
device = "cuda"
init = "gpt2"
# SFT: fine-tuning a pretrained model wants a small learning rate
batch_size = 32
lr = 1e-4
max_iters = 3000
warmup_iters = 100
eval_interval = 500
# RL
rl_steps = 200
rl_lr = 1e-5
group_size = 8
k = 5
max_new_tokens = 64
micro_batch = 32
