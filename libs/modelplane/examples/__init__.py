"""Example ONNX models made in code (no downloads): the demo model `make run`
serves, and the light and heavy MLPs the tests and benchmarks use."""
