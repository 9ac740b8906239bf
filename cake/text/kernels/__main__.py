"""`python -m cake.text.kernels`: build (or find) the cached CPU kernels and say where."""
import logging
import sys
import time

from cake.text import kernels

logging.basicConfig(level=logging.INFO, format="%(message)s")
start = time.monotonic()
try:
    print(kernels.build(), f"({time.monotonic() - start:.1f} s)")
except Exception as e:  # a machine without a compiler still serves, on plain PyTorch
    print(f"cake: CPU kernels not built: {e}", file=sys.stderr)
