"""
What every script shares besides the model: the command line (nanoGPT's configurator habit:
config/*.py presets, then --key=value overrides, then each field checked against its script's
limits), the device, torch's threads, the one way files are written (a temp file, then a rename,
so a crash never leaves half a file), a lock file, and cli(): the error boundary of every script.
"""

import ast
import contextlib
import dataclasses
import errno
import json
import math
import os
import sys
import traceback

import torch


class UserError(ValueError):
    """An error the user can fix (a bad option, file or checkpoint), raised by the shared code;
    cli() shows it as one sentence. A ValueError, so callers that catch ValueError still do.
    The scripts' own checks raise SystemExit(message), which Python already shows that way."""


def cli(main):
    """Run main(sys.argv[1:]) as a command. What a user can cause (a UserError, a missing or
    unreadable file or folder, a full disk, text that is not UTF-8, JSON that does not parse)
    becomes one sentence on stderr and exit code 1; anything else is a bug and keeps its
    traceback."""
    try:
        main(sys.argv[1:])
    # json.JSONDecodeError is a ValueError: below
    except (UserError, OSError, UnicodeDecodeError) as e:
        sys.exit(describe(e))
    except json.JSONDecodeError as e:
        sys.exit(f"a file is not valid JSON ({e})")


def describe(e):
    """The one sentence cli() shows for a user's error."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "no space left on device" + (f" to write {e.filename}" if e.filename else "")
    # raised by open(), os.*: name the path
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start})"
    return str(e)


def read_preset(path):
    """The names a config/*.py preset defines. A preset that does not run stops with its file and
    line."""
    if not os.path.isfile(path):
        raise SystemExit(
            f"config file {path} does not exist (arguments are presets or --key=value)"
        )
    scope = {}
    try:
        with open(path, encoding="utf-8") as f:
            exec(compile(f.read(), path, "exec"), scope)
    except SyntaxError as e:
        raise SystemExit(f"config file {path}:{e.lineno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise SystemExit(f"config file {path} is not UTF-8 text") from None
    except Exception as e:  # the preset is the user's code: whatever it raises is theirs to fix
        line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path][-1]
        raise SystemExit(f"config file {path}:{line}: {type(e).__name__}: {e}") from None
    return scope


def coerce(key, value, default, shown):
    """value as the type of the field's default (an int where a float is expected is fine)."""
    if isinstance(default, bool) and not isinstance(value, bool):
        raise SystemExit(f"{key} expects True or False, got {shown}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if default is not None and type(value) is not type(default):
        raise SystemExit(f"{key} expects a {type(default).__name__}, got {shown}")
    return value


def parse_config(cfg, argv, limits=None):
    """Apply config/*.py presets and --key=value overrides, in order, to the dataclass cfg; then,
    with limits, check every field (check_fields)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for arg in argv:
        if not arg.startswith("--"):
            for key, value in read_preset(arg).items():
                if key in fields:
                    checked = coerce(f"{arg}: {key}", value, getattr(cfg, key), repr(value))
                    setattr(cfg, key, checked)
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
        if isinstance(getattr(cfg, key), str) and not isinstance(value, str):
            value = raw
        setattr(cfg, key, coerce(f"--{key}", value, getattr(cfg, key), raw))
    if limits is not None:
        check_fields(cfg, limits)
    return cfg


def check_fields(cfg, limits):
    """Check each field against limits {field: (choices, ...) or an interval "[1, inf)", "(0, 1]"}.
    Every int and float field needs an entry: a new number without limits is a bug, not a
    default."""
    for f in dataclasses.fields(cfg):
        value, rule = getattr(cfg, f.name), limits.get(f.name)
        if isinstance(rule, tuple):
            if value not in rule:
                raise SystemExit(f"--{f.name}={value} is not one of {', '.join(map(str, rule))}")
        elif rule is not None:
            lo, hi = (float(x) for x in rule[1:-1].split(","))
            above = value > lo if rule[0] == "(" else value >= lo
            below = value < hi if rule[-1] == ")" else value <= hi
            if not (above and below and math.isfinite(value)):
                op = ">" if rule[0] == "(" else ">="
                bound = f"{op} {lo:g}" if hi == math.inf else f"in {rule}"
                raise SystemExit(f"--{f.name}={value} must be {bound}")
        else:
            assert type(value) not in (int, float), f"{type(cfg).__name__}.{f.name} has no limits"


def pick_device(device="auto"):
    """auto: cuda when there is one, else cpu. A device that is not there stops with a sentence."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except RuntimeError:
        raise SystemExit(
            f"--device={device} is not a device: use auto, cpu, cuda, cuda:N or mps"
        ) from None
    there = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }.get(d.type, False)
    if not there:
        raise SystemExit(
            f"--device={device} is not available on this machine: use --device=cpu or --device=auto"
        )
    return device


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
        # the new API only: mixing it with allow_tf32 raises
        torch.backends.cuda.matmul.fp32_precision = "tf32"
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
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(
                f"no space left on device to write {path}; the old file, if any, is unchanged"
            ) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)  # a failed write leaves nothing behind


@contextlib.contextmanager
def file_lock(path, what):
    """Hold the lock file path (created with O_CREAT|O_EXCL, holding our pid) for the with-block; a
    second process asking for it stops with a sentence naming `what`. The lock of a process that
    is gone (killed, crashed) is taken over; one whose pid cannot be read counts as held."""
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid = lock_owner(path)
            if attempt or pid is None or pid_alive(pid):
                raise SystemExit(
                    f"{what} is already running (pid {pid or '?'}, lock {path}); wait for it to "
                    f"finish, or delete the lock if no such process runs"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # its process is gone: take the lock over
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def lock_owner(path):
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
