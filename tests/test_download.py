"""The GPT-2 download against a real HTTP server on 127.0.0.1: HF_ENDPOINT, the progress bar, the
cache, a server that dies mid-file, and `python model.py --init=gpt2` loading from the cache with
the network gone."""

import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

import gpt2_files as G
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("config.json", "model.safetensors")


class Hub(http.server.BaseHTTPRequestHandler):
    """Serves server.files {url path: bytes}; a path in server.cut gets the full Content-Length
    but only half of its bytes before the connection closes."""

    def do_GET(self):
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if self.path in self.server.cut else data)
        self.close_connection = True

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random nano GPT-2 with the full vocabulary (the tokenizer's ids must fit), saved in the
    hub's layout."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, block_size=64)).eval()
    folder = tmp_path_factory.mktemp("src")
    G.save_hf(model, str(folder))
    return model, {f: (folder / f).read_bytes() for f in FILES}


@pytest.fixture
def hub(source):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    server.files = {
        f"/mirror/openai-community/gpt2/resolve/main/{f}": data for f, data in source[1].items()
    }
    server.cut = set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_from_hf_endpoint_then_load_offline(hub, source, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.server_port}/mirror/")
    monkeypatch.setenv("EXGRPO_CACHE", str(tmp_path))
    model = GPT.from_pretrained("gpt2")
    shown = capsys.readouterr().err
    assert "config.json: 100%" in shown and "model.safetensors: 100%" in shown  # the progress bars
    assert sorted(os.listdir(tmp_path / "gpt2")) == sorted(FILES)
    for f in FILES:
        assert (tmp_path / "gpt2" / f).read_bytes() == source[1][f]
    for key, t in source[0].state_dict().items():
        assert torch.equal(model.state_dict()[key], t), key
    # the same load from the cache, in a fresh process, with the endpoint now refusing connections
    env = dict(
        os.environ, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", EXGRPO_CACHE=str(tmp_path)
    )
    out = subprocess.run(
        [
            sys.executable,
            "model.py",
            "--init=gpt2",
            "--prompt=Hello",
            "--num_samples=1",
            "--max_new_tokens=3",
            "--device=cpu",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded gpt2 (GPT-2 weights)" in out.stdout and "Hello" in out.stdout


def test_server_dying_mid_file_leaves_no_partial_file(hub, tmp_path, monkeypatch):
    hub.cut.add("/mirror/openai-community/gpt2/resolve/main/model.safetensors")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.server_port}/mirror")
    monkeypatch.setenv("EXGRPO_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        GPT.from_pretrained("gpt2")
    message = str(e.value.code)
    assert message.startswith(
        f"could not download http://127.0.0.1:{hub.server_port}/mirror/openai-community/"
        f"gpt2/resolve/main/model.safetensors (ConnectionError: the server closed the "
        f"connection after "
    )
    assert message.endswith("and rerun") and message.count(". ") == 0  # one sentence
    assert os.listdir(tmp_path / "gpt2") == ["config.json"]  # the complete file stays, no .part
    hub.cut.clear()  # the server is back: the next call fetches only what is missing
    GPT.from_pretrained("gpt2")
    assert sorted(os.listdir(tmp_path / "gpt2")) == sorted(FILES)
