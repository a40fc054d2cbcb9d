"""Run the ``retriever`` command in a subprocess where some packages cannot be imported, as on
a machine that lacks them (a plain install, a platform without triton)."""

from __future__ import annotations

import os
import subprocess
import sys

# A None in sys.modules is what Python itself reads as "not installed": importing the name
# raises ModuleNotFoundError and importlib.util.find_spec (how libraries probe) returns None.
_SCRIPT = """
import sys

BLOCKED = {blocked!r}
for name in BLOCKED:
    sys.modules[name] = None
sys.argv = ["retriever", *sys.argv[1:]]
from retriever.cli import main

code = main(sys.argv[1:])
imported = sorted(name for name in BLOCKED if sys.modules.get(name) is not None)
assert not imported, f"imported: {{imported}}"
sys.exit(code)
"""


def retriever_without(blocked: set[str], *argv: str) -> subprocess.CompletedProcess:
    """``retriever ARGV`` with the packages ``blocked`` unimportable (and never imported)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = _SCRIPT.format(blocked=set(blocked))
    return subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env, timeout=600
    )
