"""Bit-flip kernels: a Triton kernel, a bit-exact PyTorch reference and the ``torch.library`` op."""
