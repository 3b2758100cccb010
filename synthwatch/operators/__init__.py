"""Operators: plain typed functions and small resource-owning classes; no faust imports."""
