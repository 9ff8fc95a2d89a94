"""Bad inputs and faults, as a new user meets them. Each stops with one sentence on stderr and exit
code 1, never a traceback; the cases that used to lose data leave every file byte-identical.

The scripts run in this process through their `if __name__ == "__main__"` block (runpy), as
`python script.py ...` would run them, without paying torch's import per case; an exception that
cli() did not turn into a sentence escapes and fails the test. The lock test runs real processes."""

import builtins
import errno
import json
import os
import runpy
import shutil
import subprocess
import sys
import time

import pytest
import torch

import configurator
import invert
import training
from model import GPT, PRESETS, GPTConfig, save_checkpoint
from tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANO = [
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=16",
    "--block_size=768",
    "--threads=1",
    "--device=cpu",
    "--batch_size=4",
    "--eval_problems=4",
    "--max_new_tokens=16",
    "--eval_interval=1000",
    "--seed=1",
]
EVAL = ["--max_problems=2", "--max_new_tokens=8", "--device=cpu", "--threads=1"]


def run(capsys, script, *args):
    """(exit code, stdout, stderr) of `python script args`, run in this process."""
    argv, sys.argv = sys.argv, [script, *args]
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        code = 0
    except SystemExit as e:  # what Python does with it: a message goes to stderr with exit code 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) or e.code is None else 1
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code or 0, out.out, out.err


def fails(capsys, script, *args, says):
    """Run, expect exit code 1 and one sentence (the last line of stderr) holding every word of
    says."""
    code, out, err = run(capsys, script, *args)
    assert code == 1 and "Traceback" not in err, (code, err)
    sentence = err.strip().splitlines()[-1]
    for words in says:
        assert words in sentence, sentence
    return sentence


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(folder)
        for f in files
    }


def sft(out_dir, *extra):
    return [
        "distill_rl.py",
        f"--out_dir={out_dir}",
        "--stage=sft",
        "--data=ei",
        "--name=base",
        *NANO,
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder with quick-sized coin data, a 4-step nano SFT checkpoint `base` with its log,
    and an evaluation report."""
    out = str(tmp_path_factory.mktemp("trained"))
    invert.build(invert.Config(out_dir=out, worlds="coin", n_train=32, n_val=8, n_test=8, n_ood=8))
    import distill_rl
    import evaluate

    distill_rl.main(sft(out, "--max_iters=4")[1:])
    evaluate.main([f"--out_dir={out}", *EVAL])
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    """A copy of the trained run folder to change."""
    shutil.copytree(trained, tmp_path / "run")
    return str(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# the command line: ranges, choices, cross-field checks, presets, devices


@pytest.mark.parametrize(
    "script, args, says",
    [
        ("distill_rl.py", ["--max_iters=0"], ["--max_iters=0 must be >= 1"]),
        ("distill_rl.py", ["--lr=-1"], ["--lr=-1.0 must be > 0"]),
        ("distill_rl.py", ["--eval_interval=0"], ["--eval_interval=0 must be >= 1"]),
        ("distill_rl.py", ["--ckpt_interval=-5"], ["--ckpt_interval=-5 must be >= 0"]),
        ("distill_rl.py", ["--stage=rl", "--temperature=0"], ["--temperature=0.0 must be > 0"]),
        ("distill_rl.py", ["--data_fraction=1.5"], ["--data_fraction=1.5 must be in (0, 1]"]),
        ("distill_rl.py", ["--algo=ppo"], ["--algo=ppo is not one of reinforce, grpo, exgrpo"]),
        (
            "distill_rl.py",
            ["--n_embd=30", "--n_head=4"],
            ["--n_embd=30 must be divisible by --n_head=4"],
        ),
        ("distill_rl.py", ["--name=../other"], ["--name=../other must be a plain file name"]),
        ("distill_rl.py", ["--max_iters=ten"], ["--max_iters expects a int, got ten"]),
        ("distill_rl.py", ["--device=tpu"], ["--device=tpu is not a device"]),
        (
            "distill_rl.py",
            ["--device=cuda:64"],
            ["--device=cuda:64 is not available on this machine"],
        ),
        ("invert.py", ["--n_train=0"], ["--n_train=0 must be >= 1"]),
        ("invert.py", ["--worlds=coin,mars"], ["unknown world ['mars']"]),
        ("model.py", ["--num_samples=0"], ["--num_samples=0 must be >= 1"]),
        ("model.py", ["--temperature=-1"], ["--temperature=-1.0 must be >= 0"]),
        ("evaluate.py", ["--max_problems=-1"], ["--max_problems=-1 must be >= 0"]),
        ("probe.py", ["--train_frac=1.0"], ["--train_frac=1.0 must be in (0, 1)"]),
        ("probe.py", ["--target=colour"], ["--target=colour is not one of state, answer"]),
        ("probe.py", ["--alphas=1,two"], ["--alphas=1,two must be comma-separated floats"]),
        ("bench.py", ["--shapes=tiny,huge"], ["unknown preset(s) huge"]),
        ("bench.py", ["--iters=0"], ["--iters=0 must be >= 1"]),
    ],
)
def test_bad_option_is_one_sentence(capsys, tmp_path, script, args, says):
    where = [] if script in ("model.py", "bench.py") else [f"--out_dir={tmp_path}"]
    fails(capsys, script, *where, *args, says=says)
    assert os.listdir(tmp_path) == []  # checked before anything is written


@pytest.mark.parametrize(
    "text, says",
    [
        ("max_iters = 10\nlr = 3e-3 *\n", ["bad.py:2: invalid syntax"]),
        ("max_iters = undefined_name\n", ["bad.py:1: NameError"]),
        ("max_iters = 'ten'\n", ["bad.py: max_iters expects a int, got 'ten'"]),
        ("lr = 3e-3  # caf\xe9\n".encode("latin-1"), ["bad.py is not UTF-8 text"]),
    ],
)
def test_bad_config_file_names_the_file_and_line(capsys, tmp_path, text, says):
    path = tmp_path / "bad.py"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    fails(capsys, "distill_rl.py", str(path), says=says)


def test_missing_config_file(capsys, tmp_path):
    fails(
        capsys,
        "invert.py",
        str(tmp_path / "nope.py"),
        says=["config file", "nope.py does not exist"],
    )


def test_rl_dialogue_longer_than_the_block_is_refused_up_front(capsys, run_dir):
    before = snapshot(run_dir)
    fails(
        capsys,
        "distill_rl.py",
        f"--out_dir={run_dir}",
        "--stage=rl",
        "--k=60",
        *NANO,
        says=["61 answers of --max_new_tokens=16 do not fit the student's block_size 768"],
    )
    assert snapshot(run_dir) == before


def test_a_real_process_exits_1_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("lr = (\n")
    out = subprocess.run(
        [sys.executable, "distill_rl.py", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "bad.py:1" in out.stderr, out.stderr


def test_programming_errors_keep_their_traceback():
    def buggy(argv):
        return {}["missing key"]

    with pytest.raises(KeyError):
        configurator.cli(buggy)


# ---------------------------------------------------------------------------------------------
# files: missing, unreadable, not UTF-8, not JSON, corrupt checkpoints, permissions


def write_user_jsonl(path, n=12, test=0, extra=()):
    """n training records and test test_id records of a user's arithmetic, one probe each."""
    lines = []
    for i in range(n + test):
        a, b = i % 7 + 1, i % 5 + 2
        probe = {
            "question": f"What is {a} + {a}?",
            "answer": str(2 * a),
            "rationale": f"The answer is {2 * a}.",
        }
        lines.append(
            json.dumps(
                {
                    "question": f"What is {a} + {b}?",
                    "answer": str(a + b),
                    "id": f"r{i}",
                    "rationale": f"{a} + {b} = {a + b}. The answer is {a + b}.",
                    "probes": [probe],
                    **({"split": "test_id"} if i >= n else {}),
                }
            )
        )
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines + list(extra)) + "\n")
    return str(path)


def test_user_jsonl_missing_or_a_folder(capsys, tmp_path):
    fails(
        capsys,
        "invert.py",
        f"--input_jsonl={tmp_path / 'nope.jsonl'}",
        says=["nope.jsonl does not exist"],
    )
    fails(
        capsys,
        "invert.py",
        f"--input_jsonl={tmp_path}",
        f"--out_dir={tmp_path / 'x'}",
        says=["is not a file"],
    )


def test_user_jsonl_not_utf8_names_file_and_line(capsys, tmp_path):
    path = write_user_jsonl(tmp_path / "mine.jsonl", n=1)
    with open(path, "ab") as f:
        f.write('{"question": "caf\xe9?"}\n'.encode("latin-1"))
    fails(
        capsys,
        "invert.py",
        f"--input_jsonl={path}",
        f"--out_dir={tmp_path / 'x'}",
        says=["mine.jsonl:2: not UTF-8 text"],
    )


def test_user_jsonl_bad_json_and_bad_split(capsys, tmp_path):
    path = write_user_jsonl(tmp_path / "mine.jsonl", n=2, extra=['{"question": "What is'])
    fails(
        capsys,
        "invert.py",
        f"--input_jsonl={path}",
        f"--out_dir={tmp_path / 'x'}",
        says=["mine.jsonl:3: not valid JSON"],
    )
    bad = json.dumps(
        {
            "question": "q?",
            "answer": "1",
            "rationale": "The answer is 1.",
            "id": "d",
            "split": "dev",
        }
    )
    path = write_user_jsonl(tmp_path / "mine.jsonl", n=2, extra=[bad])
    fails(
        capsys,
        "invert.py",
        f"--input_jsonl={path}",
        f"--out_dir={tmp_path / 'x'}",
        says=["record d has split 'dev'", "train, val, test_id"],
    )
    assert not os.path.exists(tmp_path / "x" / "data" / "train.jsonl")


def test_missing_and_corrupt_checkpoints(capsys, tmp_path, trained):
    torn = tmp_path / "torn.pt"
    torn.write_bytes(open(os.path.join(trained, "ckpt", "base.pt"), "rb").read()[:5000])
    fails(
        capsys,
        "invert.py",
        f"--teacher={tmp_path / 'gone.pt'}",
        f"--out_dir={tmp_path / 'x'}",
        "--worlds=coin",
        "--n_train=2",
        says=["no checkpoint at", "gone.pt"],
    )
    fails(capsys, "model.py", f"--init={torn}", says=["torn.pt is not a readable checkpoint"])
    fails(
        capsys,
        "distill_rl.py",
        f"--out_dir={trained}",
        "--stage=rl",
        f"--init={tmp_path / 'gone.pt'}",
        "--name=cold",
        *NANO,
        says=["no checkpoint at", "gone.pt"],
    )
    fails(
        capsys,
        "evaluate.py",
        f"--out_dir={tmp_path}",
        f"--ckpts={tmp_path / 'gone.pt'}",
        says=["checkpoint", "gone.pt does not exist"],
    )
    fails(
        capsys,
        "probe.py",
        f"--checkpoints={torn}",
        f"--data={trained}/data",
        f"--out_dir={tmp_path / 'p'}",
        says=["torn.pt is not a readable checkpoint"],
    )


def test_out_dir_under_a_file_and_unreadable_data(capsys, tmp_path, trained, monkeypatch):
    (tmp_path / "file").write_text("x")
    fails(
        capsys,
        "invert.py",
        f"--out_dir={tmp_path / 'file' / 'run'}",
        "--worlds=coin",
        "--n_train=2",
        says=["file/run: Not a directory"],
    )
    real = builtins.open

    def denied(path, *args, **kwargs):
        if str(path).endswith("train.jsonl"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    fails(
        capsys,
        "distill_rl.py",
        f"--out_dir={trained}",
        "--name=denied",
        *NANO,
        says=["train.jsonl: Permission denied"],
    )


def test_model_prompt_errors(capsys, trained):
    ckpt = os.path.join(trained, "ckpt", "base.pt")
    fails(
        capsys,
        "model.py",
        f"--init={ckpt}",
        "--prompt=Q: Zoltan owns a zebra",
        says=["is not in this compact"],
    )
    fails(
        capsys,
        "model.py",
        f"--init={ckpt}",
        "--prompt=Q:",
        "--max_new_tokens=800",
        says=["max_new_tokens=800 exceeds block_size 768"],
    )


def test_model_prompt_keeps_non_ascii_text(capsys, tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "gpt2tok.pt")
    save_checkpoint(path, GPT(GPTConfig(**PRESETS["nano"], vocab_size=50257)), get_tokenizer())
    code, out, err = run(
        capsys,
        "model.py",
        f"--init={path}",
        "--prompt=Caf\u00e9 \u2615\\nna\u00efve",
        "--num_samples=1",
        "--max_new_tokens=2",
        "--device=cpu",
    )
    assert code == 0, err
    # "\n" typed on the command line is a newline; the rest as typed
    assert "Caf\u00e9 \u2615\nna\u00efve" in out


# ---------------------------------------------------------------------------------------------
# run folders: never clobbered, one run per name, resume guards


def test_rerun_under_an_existing_name_is_refused(capsys, run_dir):
    before = snapshot(run_dir)
    fails(
        capsys,
        *sft(run_dir, "--max_iters=4"),
        says=["base.pt and", "base.jsonl already exist", "--resume=True", "--overwrite=True"],
    )
    assert snapshot(run_dir) == before


def test_overwrite_that_fails_before_its_first_step_keeps_the_old_run(capsys, run_dir, monkeypatch):
    """The NaN guard at step 1 of a rerun: the old checkpoint and log stay byte-identical, and the
    message does not pass the old checkpoint off as this run's."""
    real = training.optimizer_step
    nan_loss = lambda m, o, clip, loss, where: real(m, o, clip, float("nan"), where)
    monkeypatch.setattr(training, "optimizer_step", nan_loss)
    before = snapshot(run_dir)
    fails(
        capsys,
        *sft(run_dir, "--max_iters=4", "--overwrite=True"),
        says=["loss nan", "at step 1; no checkpoint of this run was written yet"],
    )
    assert snapshot(run_dir) == before


def test_nan_in_rl_names_no_checkpoint_that_does_not_exist(capsys, run_dir, monkeypatch):
    real = training.optimizer_step
    nan_loss = lambda m, o, clip, loss, where: real(m, o, clip, float("nan"), where)
    monkeypatch.setattr(training, "optimizer_step", nan_loss)
    sentence = fails(
        capsys,
        "distill_rl.py",
        f"--out_dir={run_dir}",
        "--stage=rl",
        "--rl_steps=2",
        "--k=1",
        "--rl_batch_size=2",
        "--group_size=2",
        "--difficulty=False",
        f"--init={run_dir}/ckpt/base.pt",
        *NANO,
        says=["at step 1; no checkpoint of this run"],
    )
    assert "rl_exgrpo.pt" not in sentence
    assert not os.path.exists(os.path.join(run_dir, "ckpt", "rl_exgrpo.pt"))


def test_resume_with_a_smaller_step_limit_is_refused(capsys, run_dir):
    before = snapshot(run_dir)
    fails(
        capsys,
        *sft(run_dir, "--max_iters=2", "--resume=True"),
        says=["base.pt is a sft checkpoint at step 4", "--max_iters=2", "at least 4"],
    )
    assert snapshot(run_dir) == before


def test_resume_of_another_stage_or_architecture_is_refused(capsys, run_dir):
    before = snapshot(run_dir)
    fails(
        capsys,
        "distill_rl.py",
        f"--out_dir={run_dir}",
        "--stage=rl",
        "--name=base",
        "--resume=True",
        "--difficulty=False",
        "--k=1",
        "--rl_batch_size=2",
        *NANO,
        says=["base.pt is a sft checkpoint", "--stage=rl"],
    )
    fails(
        capsys,
        *sft(run_dir, "--max_iters=8", "--resume=True", "--n_embd=32"),
        says=["base.pt: tensor", "has shape"],
    )
    assert snapshot(run_dir) == before


def test_resume_of_a_torn_checkpoint_is_refused(capsys, run_dir):
    path = os.path.join(run_dir, "ckpt", "base.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    before = snapshot(run_dir)
    fails(
        capsys,
        *sft(run_dir, "--max_iters=8", "--resume=True"),
        says=["base.pt is not a readable checkpoint"],
    )
    assert snapshot(run_dir) == before


def test_resume_with_nothing_to_resume_starts_fresh_with_a_note(capsys, run_dir):
    code, _, err = run(capsys, *sft(run_dir, "--max_iters=2", "--resume=True", "--name=new"))
    assert code == 0 and "nothing to resume" in err and "starting new from step 0" in err, err
    steps = [r["step"] for r in training.read_log(os.path.join(run_dir, "logs", "new.jsonl"))]
    assert steps == [1, 2]


def test_resume_drops_a_torn_last_log_line_with_a_note(capsys, run_dir):
    log = os.path.join(run_dir, "logs", "base.jsonl")
    with open(log, "a") as f:
        f.write('{"step": 5, "loss": 2.3')  # the process died while writing step 5
    code, _, err = run(capsys, *sft(run_dir, "--max_iters=5", "--resume=True"))
    assert code == 0 and "dropped the torn last line" in err, err
    assert [r["step"] for r in training.read_log(log)] == [1, 2, 3, 4, 5]


def test_resume_refuses_a_damaged_log(capsys, run_dir):
    log = os.path.join(run_dir, "logs", "base.jsonl")
    lines = open(log).read().splitlines()
    with open(log, "w") as f:
        f.write("\n".join([lines[0], "garbage"] + lines[1:]) + "\n")
    before = snapshot(run_dir)
    fails(
        capsys,
        *sft(run_dir, "--max_iters=6", "--resume=True"),
        says=["base.jsonl:2", "the log is damaged"],
    )
    assert snapshot(run_dir) == before


def test_a_second_run_of_the_same_name_stops_while_the_first_holds_the_lock(trained, tmp_path):
    """Two real processes: the first trains (long), the second, even with --overwrite=True, stops
    with a sentence instead of racing for the checkpoint and interleaving the log."""
    shutil.copytree(os.path.join(trained, "data"), tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = sft(tmp_path, "--name=busy", "--overwrite=True", "--max_iters=100000")
    first = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = tmp_path / "logs" / "busy.lock"
    try:
        deadline = time.time() + 120
        while not lock.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert lock.exists(), "the first run never took its lock"
        second = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert first.poll() is None  # the first run goes on
        assert lock.read_text() == str(first.pid)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"run busy in {tmp_path} is already running (pid {first.pid}" in second.stderr


def test_the_lock_of_a_dead_process_is_taken_over(capsys, run_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(os.path.join(run_dir, "logs", "base.lock"), "w") as f:
        f.write(str(dead.pid))
    code, _, err = run(capsys, *sft(run_dir, "--max_iters=5", "--resume=True"))
    assert code == 0, err
    assert not os.path.exists(os.path.join(run_dir, "logs", "base.lock"))  # released at the end


def test_a_held_lock_that_names_no_process_counts_as_held(capsys, run_dir):
    with open(os.path.join(run_dir, "logs", "base.lock"), "w") as f:
        # a process that died between creating the lock and writing its pid, or one doing so now
        f.write("")
    fails(
        capsys,
        *sft(run_dir, "--max_iters=5", "--resume=True"),
        says=["run base in", "is already running (pid ?"],
    )


def test_training_on_worlds_the_data_lacks(capsys, run_dir):
    fails(
        capsys,
        *sft(run_dir, "--name=swapped", "--worlds=coin,swap"),
        says=["--worlds=coin,swap", "has no records of swap (it has coin)"],
    )
    fails(
        capsys,
        *sft(os.path.join(run_dir, "nothing")),
        says=["train.jsonl does not exist", "python invert.py"],
    )


# ---------------------------------------------------------------------------------------------
# user data: its own run folder; invert.py never replaces another run's data


def test_user_data_goes_to_its_own_run_folder(capsys, tmp_path, trained, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained, tmp_path / "out" / "default")
    before = snapshot(tmp_path / "out" / "default")
    path = write_user_jsonl(tmp_path / "mine.jsonl")
    code, out, err = run(capsys, "invert.py", f"--input_jsonl={path}")
    assert code == 0, err
    assert snapshot(tmp_path / "out" / "default") == before
    folder = tmp_path / "out" / "user-mine" / "data"
    assert sorted(os.listdir(folder)) == ["stats.json", "train.jsonl"]


def test_invert_refuses_to_replace_another_runs_data(capsys, run_dir, tmp_path):
    before = snapshot(run_dir)
    path = write_user_jsonl(tmp_path / "mine.jsonl")
    fails(
        capsys,
        "invert.py",
        f"--input_jsonl={path}",
        f"--out_dir={run_dir}",
        says=["run/data holds data made with other settings", "--overwrite=True"],
    )
    fails(
        capsys,
        "invert.py",
        f"--out_dir={run_dir}",
        "--worlds=coin",
        "--n_train=33",
        "--n_val=8",
        "--n_test=8",
        "--n_ood=8",
        says=["other settings (n_train differ)"],
    )
    assert snapshot(run_dir) == before


def test_invert_with_overwrite_leaves_no_split_of_the_old_data(capsys, run_dir, tmp_path):
    path = write_user_jsonl(tmp_path / "mine.jsonl", test=3)
    code, _, err = run(
        capsys, "invert.py", f"--input_jsonl={path}", f"--out_dir={run_dir}", "--overwrite=True"
    )
    assert code == 0, err
    folder = os.path.join(run_dir, "data")
    assert sorted(os.listdir(folder)) == ["stats.json", "test_id.jsonl", "train.jsonl"]


def test_invert_rerun_with_the_same_settings_is_allowed(capsys, run_dir):
    def splits():
        files = snapshot(os.path.join(run_dir, "data"))
        return {f: data for f, data in files.items() if f.endswith(".jsonl")}

    before = splits()
    code, _, err = run(
        capsys,
        "invert.py",
        f"--out_dir={run_dir}",
        "--worlds=coin",
        "--n_train=32",
        "--n_val=8",
        "--n_test=8",
        "--n_ood=8",
        "--n_examples=0",
    )
    assert code == 0, err
    assert splits() == before  # (stats.json records the new out_dir and n_examples)


# ---------------------------------------------------------------------------------------------
# evaluate.py never replaces a report with an empty one


def test_evaluate_refuses_a_world_or_split_that_matches_nothing(capsys, run_dir):
    before = snapshot(os.path.join(run_dir, "report"))
    fails(
        capsys,
        "evaluate.py",
        f"--out_dir={run_dir}",
        "--worlds=swap",
        *EVAL,
        says=["--worlds=swap", "test_id.jsonl has no problems of swap (it has coin)"],
    )
    fails(
        capsys,
        "evaluate.py",
        f"--out_dir={run_dir}",
        "--splits=test_id,ood_longer",
        *EVAL,
        says=["ood_longer.jsonl does not exist"],
    )
    assert snapshot(os.path.join(run_dir, "report")) == before


def test_evaluate_refuses_a_corrupt_results_file(capsys, run_dir):
    path = os.path.join(run_dir, "report", "results.json")
    with open(path, "r+b") as f:
        f.truncate(100)
    fails(
        capsys,
        "evaluate.py",
        f"--out_dir={run_dir}",
        "--reuse=True",
        *EVAL,
        says=["results.json is not valid JSON", "run without --reuse"],
    )


def test_evaluate_on_user_data_without_a_test_split(capsys, tmp_path, trained):
    path = write_user_jsonl(tmp_path / "mine.jsonl")
    invert.build(invert.Config(input_jsonl=path, out_dir=str(tmp_path / "user")))
    shutil.copytree(os.path.join(trained, "ckpt"), tmp_path / "user" / "ckpt")
    fails(
        capsys,
        "evaluate.py",
        f"--out_dir={tmp_path / 'user'}",
        *EVAL,
        says=["user/data has no test split", '"split": "test_id"'],
    )
    assert not os.path.exists(tmp_path / "user" / "report")


def test_probe_on_a_world_the_data_lacks(capsys, trained, tmp_path):
    fails(
        capsys,
        "probe.py",
        f"--checkpoints={trained}/ckpt/base.pt",
        f"--data={trained}/data",
        "--world=swap",
        f"--out_dir={tmp_path}",
        says=["has no problems of world 'swap' (it has coin)"],
    )


# ---------------------------------------------------------------------------------------------
# a full disk says so and leaves no temp file


def fill_disk(monkeypatch, marker=".tmp"):
    """Every write to a file whose name holds marker (the atomic writer's temp files) fails as on a
    full disk."""
    real = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_full(path, mode="r", *args, **kwargs):
        f = real(path, mode, *args, **kwargs)
        return Full(f) if marker in str(path) and "w" in mode else f

    monkeypatch.setattr(builtins, "open", open_full)


def test_full_disk_while_writing_data(capsys, run_dir, monkeypatch):
    fill_disk(monkeypatch)
    before = snapshot(run_dir)
    # other data (a new seed): the same bytes would not be written again at all
    fails(
        capsys,
        "invert.py",
        f"--out_dir={run_dir}",
        "--worlds=coin",
        "--n_train=32",
        "--n_val=8",
        "--n_test=8",
        "--n_ood=8",
        "--seed=7",
        "--overwrite=True",
        says=["no space left on device to write", "train.jsonl", "unchanged"],
    )
    assert snapshot(run_dir) == before  # nothing half-written, no .tmp left


def test_full_disk_while_saving_a_checkpoint(capsys, run_dir, monkeypatch):
    fill_disk(monkeypatch, ".pt.tmp")
    before = snapshot(os.path.join(run_dir, "ckpt"))
    fails(
        capsys,
        *sft(run_dir, "--max_iters=5", "--resume=True"),
        says=["no space left on device to write", "base.pt"],
    )
    assert snapshot(os.path.join(run_dir, "ckpt")) == before
