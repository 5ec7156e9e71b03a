"""fp16_triton.kernels: the device layer (Triton kernels, their launchers, pure-torch references)."""
