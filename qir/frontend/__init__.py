"""Frontends: bring models into qir (torch.export programs, PyTorch modules, ONNX files)."""
