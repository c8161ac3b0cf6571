"""Tiny models built from configs (random weights, no download) for every supported architecture."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTBigCodeConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Starcoder2Config,
)

from compressor import linalg

REPO = Path(__file__).resolve().parents[1]  # the checkout, for tests that start a fresh interpreter on it
VOCAB = 256
_ATTN = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_ATTN, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**_ATTN, num_key_value_heads=1),
    "qwen2": lambda: Qwen2Config(**_ATTN, num_key_value_heads=2),
    "qwen3": lambda: Qwen3Config(**_ATTN, num_key_value_heads=2, head_dim=16),
    "gemma3_text": lambda: Gemma3TextConfig(
        **{**_ATTN, "num_hidden_layers": 3}, num_key_value_heads=1, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
    "starcoder2": lambda: Starcoder2Config(**_ATTN, num_key_value_heads=2),
    "gpt_bigcode": lambda: GPTBigCodeConfig(
        n_embd=64, n_inner=96, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, multi_query=True, bos_token_id=0, eos_token_id=0,
    ),
    "gpt2": lambda: GPT2Config(n_embd=64, n_inner=96, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=0, eos_token_id=0),
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    # Random init gives near-flat spectra; a decaying spectrum makes truncation choices matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                u, s, vh = linalg.svd([p.float()])[0]
                decay = torch.exp(-torch.arange(s.numel(), dtype=torch.float32) / (s.numel() / 4))
                p.copy_((u * (s * decay)) @ vh)
    return model


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with a 256-token vocabulary, built offline."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(params=sorted(CONFIGS))
def arch(request):
    return request.param


def load_benchmark(name: str):
    """A script of benchmarks/ imported as a module (they are not a package), for tests that keep it from rotting."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def start_child(prefix: str, module: str, body: str, deadline: float = 120.0):
    """A fresh interpreter on the checkout, with a TMPDIR of its own (reachable by the sandbox's
    uid), that imports compressor.eval.`module` and runs `body`; returned as (process, tmpdir) once
    two sandbox folders exist in that TMPDIR, i.e. two programs are running."""
    import glob
    import os
    import subprocess
    import sys
    import tempfile
    import time

    tmpdir = tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None)
    os.chmod(tmpdir, 0o755)
    code = f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom compressor.eval import {module}\n{body}print('finished')\n"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "TMPDIR": tmpdir}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + deadline  # the child imports torch first
    while len(glob.glob(os.path.join(tmpdir, "compressor-sandbox-*"))) < 2 and time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)  # let the programs start
    return proc, tmpdir


def processes_with(tag: str) -> list[int]:
    """Pids of the processes whose command line holds `tag`."""
    import os

    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if tag.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def interrupt_child(proc, tmpdir: str, signum: int, timeout: float = 60.0) -> tuple[int, str, str]:
    """Send `signum` to a start_child process; it must exit within 3 s leaving no sandbox folder
    and no program running. Returns (returncode, stdout, stderr); the TMPDIR is removed."""
    import os
    import shutil
    import time

    try:
        proc.send_signal(signum)
        start = time.monotonic()
        stdout, stderr = proc.communicate(timeout=timeout)
        assert time.monotonic() - start < 3.0
        assert os.listdir(tmpdir) == [] and "finished" not in stdout, stderr
        assert processes_with(tmpdir) == []
        return proc.returncode, stdout, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(tmpdir, ignore_errors=True)
