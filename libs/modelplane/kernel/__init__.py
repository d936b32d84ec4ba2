"""The shared kernel every service builds on: settings, errors, server bootstrap, telemetry."""
