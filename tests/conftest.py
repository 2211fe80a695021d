"""Test session setup.

Triton decides between compiled kernels and its CPU interpreter when `triton.language` is first
imported, and timm imports it as a side effect. Without a GPU only the interpreter works, so set
it before anything imports Triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
