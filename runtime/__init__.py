"""mjsd runtime: bundle loading, ONNX Runtime sessions, decoding algorithms. Needs no torch.

    from mjsd.runtime import Engine
    result = Engine.from_bundle().generate("def fibonacci(n):", algo="mtad")
"""
from .bundle import Bundle, load_bundle
from .config import GenerationConfig
from .engine import Engine, Result, TextStream, builtin_bundle_path
from .errors import BundleError, ConfigError, ContextLengthError, ExportError, MjsdError
from .stats import GenerationStats

__all__ = ["Bundle", "BundleError", "ConfigError", "ContextLengthError", "Engine", "ExportError",
           "GenerationConfig", "GenerationStats", "MjsdError", "Result", "TextStream", "builtin_bundle_path",
           "load_bundle"]
