"""Monitoring service: prediction logs and their summaries per model version."""
