"""mjsd runtime: bundle loading, ONNX Runtime sessions, decoding algorithms. Needs no torch."""
