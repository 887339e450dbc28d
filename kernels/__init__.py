"""Triton kernels, one op per file (``kernels/<op>.py``), shipped as ``llmfast.kernels``.

Each file reads top to bottom: the maths and the bytes moved, the ``@triton.jit``
kernels, the launchers. Nothing runs at import time beyond defining kernels.
Each also lists ``COMPILE_CONFIGS``: the (kernel, signature, constexprs) triples
its launchers can produce, which ``tests/test_triton_compile.py`` compiles for
sm_80 and sm_90 without a GPU.
"""
