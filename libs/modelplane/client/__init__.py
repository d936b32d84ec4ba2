"""Typed Python clients of the modelplane services."""
