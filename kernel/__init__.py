"""The `codegen` Jupyter kernel (kernel.py) and the IPython extension (magics.py).

Nothing heavy is imported here: `%load_ext codegen_repl` and the kernel import what they need.
"""

from __future__ import annotations
