"""On-device runtimes (installed as ``fer_edge.targets``). Nothing here may import torch."""
