"""fp16_triton.kernels: the device layer.

Triton kernels with their launchers (``nonfinite``, ``adam``, ``sgd``, sharing the pointer
tables of ``multi_tensor``) and their pure-torch references (``reference``).
"""
