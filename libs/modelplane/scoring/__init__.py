"""Scoring registered models outside the inference service: batch jobs over files or a
query, and stream consumers of Redis Streams."""
