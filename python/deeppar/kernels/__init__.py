"""Triton kernels, all in this package.

They run compiled on CUDA tensors and, for testing, on CPU tensors under ``TRITON_INTERPRET=1``
(set before triton is imported). Importing a kernel module requires triton; callers check
``deeppar.ops.resolve`` first. Each launcher is a ``torch.library.custom_op`` with a fake.
"""
