"""The export stage: Hugging Face checkpoints -> a validated mjsd bundle (needs the `export` extra: torch, optimum)."""
from .pipeline import export_bundle

__all__ = ["export_bundle"]
