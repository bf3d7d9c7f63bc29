"""Text encoders for task descriptions (and, with the generators, in-context task vectors)."""

from .text import DEFAULT_MODEL_ID, EncoderUnavailable, TextEncoder, default_model_path, native_bf16, resolve_dtype

__all__ = ["DEFAULT_MODEL_ID", "EncoderUnavailable", "TextEncoder", "default_model_path", "native_bf16", "resolve_dtype"]
