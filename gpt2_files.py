"""
GPT-2's files on disk, in Hugging Face's layout, without transformers: the download of OpenAI's
weights from the hub, safetensors (8-byte little-endian header length, JSON header, raw bytes) read
and written by hand, the model config a file implies, and save_hf, which writes a student back as a
folder GPT2LMHeadModel.from_pretrained loads. model.GPT.from_pretrained maps the tensors onto its
modules.
"""

import json
import math
import os
import urllib.request

import torch

from configurator import UserError, atomic_write

# n_head and n_embd of the four OpenAI GPT-2 sizes (the same as model.PRESETS)
OPENAI_SIZES = {
    "gpt2": (12, 768),
    "gpt2-medium": (16, 1024),
    "gpt2-large": (20, 1280),
    "gpt2-xl": (25, 1600),
}

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# HF's GPT-2 keeps these as Conv1D weights, stored (in, out); nn.Linear stores (out, in)
CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise UserError(f"{path} is truncated: header of {n} bytes, file of {len(data)} bytes")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} does not start with a safetensors JSON header ({e})") from None
    if not isinstance(header, dict):
        raise UserError(
            f"{path} does not start with a safetensors JSON header (a JSON object of tensors)"
        )
    body, tensors = memoryview(data)[8 + n :], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in ST_DTYPES:
            raise UserError(
                f"tensor {name} in {path} has dtype {info.get('dtype')}; supported: F32, F16, BF16"
            )
        (begin, end), dtype = info["data_offsets"], ST_DTYPES[info["dtype"]]
        if end > len(body):
            raise UserError(
                f"{path} is truncated: tensor {name} ends at byte {end}, data has {len(body)}"
            )
        if (end - begin) != math.prod(info["shape"]) * dtype.itemsize:
            raise UserError(
                f"tensor {name} in {path}: {end - begin} bytes do not hold shape {info['shape']}"
            )
        t = (
            torch.frombuffer(bytearray(body[begin:end]), dtype=dtype)
            if end > begin
            else torch.empty(0, dtype=dtype)
        )
        tensors[name] = t.reshape(info["shape"])
    return tensors


def gpt2_config(folder, tensors, file):
    """GPTConfig fields of GPT-2 tensors: sizes from the tensors, n_head from config.json beside
    them (or, for a bare file, from the four OpenAI sizes)."""
    if "wte.weight" not in tensors or "wpe.weight" not in tensors:
        raise UserError(f"{file} has no tensor wte.weight / wpe.weight: not a GPT-2 checkpoint")
    vocab, n_embd = tensors["wte.weight"].shape
    n_layer = 1 + max((int(k.split(".")[1]) for k in tensors if k.startswith("h.")), default=-1)
    cfg_path = os.path.join(folder, "config.json")
    if os.path.isfile(cfg_path):
        hf_config = json.load(open(cfg_path))
        n_head = hf_config["n_head"]
        if hf_config.get("n_layer", n_layer) != n_layer:
            raise UserError(
                f"{cfg_path} says n_layer={hf_config['n_layer']}, but {file} has tensors for "
                f"{n_layer} layers: the file is incomplete or does not belong to this config"
            )
    else:
        known = {n_embd: n_head for n_head, n_embd in OPENAI_SIZES.values()}
        if n_embd not in known:
            raise UserError(
                f"{file} has no config.json beside it to say n_head for n_embd={n_embd}"
            )
        n_head = known[n_embd]
    return dict(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        vocab_size=vocab,
        block_size=tensors["wpe.weight"].shape[0],
    )


def fetch(url, dest):
    """url -> dest through dest.part, with a progress bar. http.client returns a body cut short by
    a closed connection without an error, so the byte count is checked against Content-Length."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=30) as r, open(dest + ".part", "wb") as f:
        total = int(r.headers.get("Content-Length", 0)) or None
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest))
        while chunk := r.read(1 << 20):
            f.write(chunk)
            bar.update(len(chunk))
        bar.close()
    if total is not None and bar.n != total:
        raise ConnectionError(f"the server closed the connection after {bar.n} of {total} bytes")
    os.replace(dest + ".part", dest)


def download_gpt2(name):
    """Fetch config.json and model.safetensors of an OpenAI GPT-2 once, into $EXGRPO_CACHE/name
    (default ~/.cache/exgrpo/name), from $HF_ENDPOINT (the hub's own variable for a mirror;
    default https://huggingface.co)."""
    repo, cache = (
        f"openai-community/{name}",
        os.path.join(os.path.expanduser("~"), ".cache", "exgrpo"),
    )
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    folder = os.path.join(os.environ.get("EXGRPO_CACHE", cache), name)
    os.makedirs(folder, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        dest, url = os.path.join(folder, file), f"{endpoint}/{repo}/resolve/main/{file}"
        if os.path.exists(dest):
            continue
        try:
            fetch(url, dest)
        except Exception as e:
            if os.path.exists(dest + ".part"):
                os.remove(dest + ".part")  # never leave a half-downloaded file behind
            raise SystemExit(
                f"could not download {url} ({type(e).__name__}: {e}); place config.json and "
                f"model.safetensors from {endpoint}/{repo} in {folder} and rerun"
            ) from None
    return folder


def read_gpt2(name_or_path):
    """(GPTConfig fields, tensors named as model.GPT names them without "transformer.", file) of a
    GPT-2 name (downloaded once), a Hugging Face folder or a model.safetensors file."""
    path = name_or_path
    if name_or_path in OPENAI_SIZES and not os.path.exists(name_or_path):
        path = download_gpt2(name_or_path)
    if os.path.isdir(path):
        folder, file = path, os.path.join(path, "model.safetensors")
    else:
        folder, file = os.path.dirname(path) or ".", path
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"no GPT-2 weights at {file}: expected a Hugging Face model.safetensors"
        )
    # the hub's file has no "transformer." prefix and keeps two attention buffers we do not need
    tensors = {
        k.removeprefix("transformer."): v
        for k, v in read_safetensors(file).items()
        if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"
    }
    return gpt2_config(folder, tensors, file), tensors, file


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        blob = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dtype = {v: k for k, v in ST_DTYPES.items()}[t.dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    atomic_write(path, b"".join([len(head).to_bytes(8, "little"), head] + blobs))


def save_hf(model, path, tokenizer=None):
    """Write model (a model.GPT) as a Hugging Face GPT-2 folder (config.json + model.safetensors)
    that GPT2LMHeadModel.from_pretrained loads. A compact-vocab student's ids are not GPT-2's: its
    id map goes to exgrpo_tokenizer.json beside the weights."""
    os.makedirs(path, exist_ok=True)
    c = model.config
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_embd": c.n_embd,
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "bos_token_id": c.vocab_size - 1,
        "eos_token_id": c.vocab_size - 1,
        "tie_word_embeddings": True,
    }
    tensors = {
        key: t.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else t
        for key, t in model.state_dict().items()
        if key != "lm_head.weight"  # tied to wte
    }
    write_safetensors(os.path.join(path, "model.safetensors"), tensors)
    atomic_write(os.path.join(path, "config.json"), json.dumps(hf_config, indent=2))
    if tokenizer is not None and tokenizer.state()["kind"] != "gpt2":
        atomic_write(os.path.join(path, "exgrpo_tokenizer.json"), json.dumps(tokenizer.state()))
