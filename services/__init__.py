"""The four modelplane services, importable as `modelplane.services.<name>`."""
