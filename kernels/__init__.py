"""Triton kernels for sparse decoding, installed as ``acttail.kernels``."""
