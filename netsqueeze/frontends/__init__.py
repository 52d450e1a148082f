"""Frontends: torch (fx / torch.export) and ONNX models lowered into the IR."""
