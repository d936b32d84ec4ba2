"""modelplane: production serving for ONNX models over gRPC."""

__version__ = "0.1.0"
