"""What transformers makes of a model folder, as the toolkit's errors: the one reader of
config.json and the one place weights are loaded from a folder (docs/reference/errors.md, class 5: a
damaged or foreign checkpoint is a CompressorError, never a raw exception from transformers)."""

from __future__ import annotations

import json
from pathlib import Path

from compressor.errors import CompressorError


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_config_json(folder: str | Path) -> dict:
    """A model folder's config.json as a dict; the one reader of that file, so that a damaged one
    (unreadable, not JSON, a JSON list) is one error wherever it is met."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CompressorError(f"{path} is unreadable or not JSON ({first_line(e)}); re-download or re-save the model") from None
    if not isinstance(raw, dict):
        raise CompressorError(f"{path} holds a JSON {type(raw).__name__}, not an object, so it is not a Hugging Face model config; "
                              "re-save the model with save_pretrained")
    return raw


def from_pretrained(cls, location, where, **kwargs):
    """cls.from_pretrained(location, **kwargs) with the loading report checked and every failure of
    a damaged or foreign checkpoint as one CompressorError: the one place weights are loaded from a
    folder (load_model, export.checkpoint.load). A PyTorch .bin that is a pickle of more than
    tensors is refused as such (never loaded with weights_only=False: it could run code)."""
    import pickle

    from safetensors import SafetensorError

    try:
        model, info = cls.from_pretrained(location, output_loading_info=True, **kwargs)
    except CompressorError:
        raise
    except pickle.UnpicklingError:
        raise CompressorError(f"{where}: its PyTorch .bin weights are a pickle holding more than tensors, which is refused because loading it "
                              "could run code; convert it to safetensors where you trust it, or use a safetensors checkpoint") from None
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError, ImportError, SafetensorError) as e:
        raise CompressorError(f"could not load the model folder {where}: {type(e).__name__}: {first_line(e)}; "
                              "it needs an intact config.json, weights and a tokenizer") from e
    check_loading_info(info, str(where))
    return model


def check_loading_info(info: dict, where: str) -> None:
    """What transformers reports after loading: anything missing, unexpected or mismatched means
    random or dropped weights, which the static check_checkpoint could not see (e.g. .bin files)."""
    for key, what in (("missing_keys", "lacks"), ("unexpected_keys", "holds unexpected"), ("mismatched_keys", "has mis-shaped")):
        found = sorted(str(k) for k in (info.get(key) or ()))
        if found:
            raise CompressorError(f"{where}: the checkpoint {what} tensors ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); "
                                  "transformers would load random or no values for them. Re-download or re-save the checkpoint")
