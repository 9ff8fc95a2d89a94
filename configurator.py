"""
What every script shares besides the model: the command line (nanoGPT's configurator habit:
config/*.py presets, then --key=value overrides), the device, torch's threads, and the one way
files are written (a temp file, then a rename, so a crash never leaves half a file).
"""
import ast
import contextlib
import dataclasses
import os

import torch


def parse_config(cfg, argv):
    """Apply config/*.py presets and --key=value overrides, in order, to the dataclass cfg."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise SystemExit(f"config file {arg} does not exist (arguments are presets or --key=value)")
            scope = {}
            exec(open(arg).read(), scope)
            for key, value in scope.items():
                if key in fields:
                    setattr(cfg, key, value)
            continue
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            raise SystemExit(f"argument {arg} must look like --key=value")
        if key not in fields:
            raise SystemExit(f"unknown option --{key}; options are: {', '.join(sorted(fields))}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        default = getattr(cfg, key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise SystemExit(f"--{key} expects True or False, got {raw}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, str) and not isinstance(value, str):
            value = raw
        if default is not None and type(value) is not type(default):
            raise SystemExit(f"--{key} expects a {type(default).__name__}, got {raw}")
        setattr(cfg, key, value)
    return cfg


def pick_device(device="auto"):
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def mixed_precision(device, dtype="auto"):
    """A fresh context for forward passes. dtype auto = bfloat16 on CUDA, float32 elsewhere (bf16
    is 2-4x slower than fp32 on CPUs without bf16 units). Under bf16 autocast the matmuls and the
    attention run in bf16 while the weights, gradients and AdamW state stay fp32, and the callers
    take log-softmax, cross-entropy and the KL in fp32. On CUDA, the fp32 matmuls left over may
    use TF32 (10 mantissa bits, plenty for training, 8x the fp32 rate on A100/H100)."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise SystemExit(f"--dtype={dtype} is not one of auto, float32, bfloat16")
    device_type = str(device).split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # the new API only: mixing it with allow_tf32 raises
    if dtype == "float32" or (dtype == "auto" and device_type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def set_threads(n):
    """0 keeps torch's default. On a busy 2-core machine 1 thread can be 10x faster than 2."""
    if n > 0:
        torch.set_num_threads(n)


def atomic_write(path, data):
    """Write data (str as UTF-8, or bytes) to a temp file beside path, then rename it over path: a
    reader sees the old file or the new one, never half of one. The temp name carries the process
    id, so two processes writing the same path do not share a temp file."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)  # a failed write leaves nothing behind
