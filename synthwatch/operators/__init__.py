"""Operators: plain typed functions and small resource-owning classes; nothing here imports faust."""
