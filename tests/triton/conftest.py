"""Setup of the Triton tests: they run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported (``make test`` sets it in the
environment of this directory's pytest process); the line below is a safety net for a
bare ``pytest tests/triton``. It only helps if nothing imported triton earlier in the
process (the parent ``tests/conftest.py`` imports fastsel, which must therefore not
import ``fastsel.triton`` eagerly).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
