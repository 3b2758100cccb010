"""Detector architectures, weight converters, the model store and exporters."""
