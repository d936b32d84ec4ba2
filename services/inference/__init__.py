"""Inference service: KServe v2 over gRPC, a dynamic batcher, ONNX Runtime on CPU or GPU."""
