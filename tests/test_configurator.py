"""configurator.py: --key=value and preset parsing with its errors, the precision context per
device, and the atomic writer."""

import contextlib
import dataclasses
import os
import warnings

import pytest
import torch

import configurator as C


@dataclasses.dataclass
class Cfg:
    steps: int = 10
    lr: float = 3e-4
    compile: bool = False
    name: str = "run"


def test_parse_config_types():
    cfg = C.parse_config(Cfg(), ["--steps=20", "--lr=1", "--compile=True", "--name=exgrpo"])
    assert (cfg.steps, cfg.lr, cfg.compile, cfg.name) == (20, 1.0, True, "exgrpo")
    assert type(cfg.lr) is float and type(cfg.steps) is int
    cfg = C.parse_config(Cfg(), ["--lr=2e-5", "--name=123", "--compile=False"])
    assert (cfg.lr, cfg.name, cfg.compile) == (2e-5, "123", False)
    assert type(cfg.name) is str


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--stepz=3", "unknown option --stepz; options are: compile, lr, name, steps"),
        ("--steps=2.5", "--steps expects a int, got 2.5"),
        ("--steps=abc", "--steps expects a int, got abc"),
        ("--compile=1", "--compile expects True or False, got 1"),
        ("--lr=True", "--lr expects a float, got True"),
        ("--steps", "argument --steps must look like --key=value"),
        ("config/none.py", "config file config/none.py does not exist"),
    ],
)
def test_parse_config_errors(arg, message):
    with pytest.raises(SystemExit) as e:
        C.parse_config(Cfg(), [arg])
    assert message in str(e.value.code)


def test_parse_config_preset_file(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text(
        "import math\nsteps = 5 * 4\nlr = math.sqrt(1e-8)\nnot_a_field = 1\n_private = 2\n"
    )
    cfg = C.parse_config(Cfg(), [str(preset)])
    assert (cfg.steps, cfg.lr, cfg.name) == (20, 1e-4, "run") and not hasattr(cfg, "not_a_field")
    cfg = C.parse_config(Cfg(), [str(preset), "--steps=3"])  # applied in order: later wins
    assert cfg.steps == 3
    cfg = C.parse_config(Cfg(), ["--steps=3", str(preset)])
    assert cfg.steps == 20


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "f.json")
    C.atomic_write(path, "old")
    C.atomic_write(path, b"new \xe2\x9c\x93")
    assert open(path, encoding="utf-8").read() == "new \u2713"

    def crash(src, dst):  # the process dies after writing the temp file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(C.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        C.atomic_write(path, "half")
    monkeypatch.undo()
    assert open(path).read() == "new \u2713" and os.listdir(tmp_path) == ["f.json"]


def test_mixed_precision_on_cpu_is_fp32_and_leaves_tf32_alone():
    before = torch.backends.cuda.matmul.fp32_precision
    assert isinstance(C.mixed_precision("cpu"), contextlib.nullcontext)
    assert isinstance(C.mixed_precision("cpu", "float32"), contextlib.nullcontext)
    assert torch.backends.cuda.matmul.fp32_precision == before  # the CUDA branch was not taken
    forced = C.mixed_precision("cpu", "bfloat16")  # the autocast path itself, for the tests
    assert isinstance(forced, torch.autocast)
    assert forced.device == "cpu" and forced.fast_dtype == torch.bfloat16
    with pytest.raises(SystemExit, match="--dtype=float16 is not one of auto, float32, bfloat16"):
        C.mixed_precision("cpu", "float16")


def test_mixed_precision_on_cuda_is_bf16_autocast_with_tf32():
    """The CUDA branch, taken by name (no GPU needed to choose it): bf16 autocast and TF32 matmuls.
    The setting is restored by hand: pytest's monkeypatch cannot undo torch's backend attributes."""
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a CPU-only build warns that it disables CUDA autocast
            ctx = C.mixed_precision("cuda:0")
        assert isinstance(ctx, torch.autocast)
        assert ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
