"""compressor: post-training rank reduction, quantisation and compensation adapters for LLMs."""

__version__ = "0.1.0"

from compressor.errors import CompressorError  # noqa: E402

__all__ = ["CompressorError", "__version__", "compress", "load"]


def compress(*args, **kwargs):
    """Compress a model with a recipe; see `compressor.api.compress`."""
    from compressor.api import compress as _compress

    return _compress(*args, **kwargs)


def load(*args, **kwargs):
    """Load a folder written by `compressor` without remote code; see `compressor.export.checkpoint.load`."""
    from compressor.export.checkpoint import load as _load

    return _load(*args, **kwargs)
