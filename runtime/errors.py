"""Errors users see. Every message says what is wrong and what to do about it."""


class MjsdError(Exception):
    """Base class for every error mjsd raises on purpose (the CLI prints these without a traceback)."""


class BundleError(MjsdError):
    """A model bundle is missing, corrupt, or does not match its manifest."""


class ExportError(MjsdError):
    """An export was refused (tokenizer mismatch, wrong model kind, failed validation...)."""


class ConfigError(MjsdError, ValueError):
    """An invalid parameter value."""


class ContextLengthError(MjsdError, ValueError):
    """A prompt or generation that would not fit in the model's context."""
