"""Triton kernels for ftlab, shipped as `ftlab.kernels`.

Each kernel lives in its own plain `.py` file beside a PyTorch reference of the same maths.
"""
