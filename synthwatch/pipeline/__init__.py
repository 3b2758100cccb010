"""Orchestration: settings, topology, CLI, logging, metrics and web views."""
