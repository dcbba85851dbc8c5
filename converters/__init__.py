"""Merge, export and quantize fer-edge models for Jetson (TensorRT) and Android (TFLite); installed as ``fer_edge.converters``."""
