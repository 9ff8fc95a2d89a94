# results/rl_study.sh: the RL study (results/README.md, "The RL study"), applied after
# config/cpu_tiny.py and config/study.py. Chosen on validation copies before any test split was
# scored: at 10% of the training questions the seed-1 EI-SFT student answers 87.5% of val,
# 52.5 / 63.0 / 73.5% of val_ood_long / val_ood_reverse / val_ood_names (at 25%: 97.0 in
# distribution, at its ceiling).
data_fraction = 0.1  # SFT and RL draw from the same seeded 10% of the training questions
rl_steps = 180  # 180 steps of 8 questions: 1440 question visits, 3x the first study's 480
ckpt_interval = 60  # a killed RL row resumes from its last 60 steps
n_test, n_ood = 1000, 1000  # test problems per split (the first study scored 300)
