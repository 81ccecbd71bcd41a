"""Triton kernels of utilgen, installed as ``utilgen.kernels``.

Only the op modules in ``utilgen.ops`` import these, lazily, so that
``import utilgen`` never imports triton. On CPU the kernels run under
``TRITON_INTERPRET=1``, which must be set before this package is imported
(``@triton.jit`` reads it when the decorators run).
"""

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
