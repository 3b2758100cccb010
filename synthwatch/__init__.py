"""synthwatch: a streaming scanner for synthetic media."""

__version__ = "0.1.0"
