"""mjsd export stage: Hugging Face target + draft -> self-describing ONNX model bundle (needs the `export` extra)."""
