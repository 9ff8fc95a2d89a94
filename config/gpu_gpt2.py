# One GPU, GPT-2 124M student initialised from OpenAI's weights (downloaded once to
# ~/.cache/exgrpo/gpt2), full GPT-2 vocabulary, the paper's k = 5 probes per dialogue. Sized so
# that `bash run.sh --preset config/gpu_gpt2.py` takes about 20 minutes on one H100 (29 if
# run.sh's concurrent trainings do not overlap at all): the arithmetic is in docs/gpu.md.
out_dir = "out/gpu_gpt2"
device = "cuda"
init = "gpt2"
# SFT: fine-tuning a pretrained model wants a small learning rate
batch_size = 32
grad_accum = 2  # sorted by length, the two halves pad apart: 10k instead of 17k tokens a step
lr = 1e-4
max_iters = 3000
warmup_iters = 100
eval_interval = 500
# RL: sampling dominates (about 1.5 of 1.75 s a step)
rl_steps = 150
rl_batch_size = 8
rl_lr = 1e-5
group_size = 8
k = 5
max_new_tokens = 64
micro_batch = 8  # ~7 GB in the update (docs/gpu.md); run.sh runs two RL rows at once
