"""CUDA sources of the selective-scan kernels, shipped as package data (read by ``plugins/selective_scan/cuda.py``)."""
