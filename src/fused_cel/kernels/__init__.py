"""The Triton kernels, one file per kernel, each with its launcher; common.py holds the
@triton.jit helpers they share, and fused_cel.backends.torch the PyTorch twin of each."""
