"""Backends: emit the IR as a torch.fx GraphModule or an ONNX ModelProto."""
