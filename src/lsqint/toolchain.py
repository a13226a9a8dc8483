"""The host's C compiler, for the C export's host runtime and the torch runtime's CPU kernels.
Imports nothing of lsqint: both backends read it without importing each other."""

from __future__ import annotations

import os
import shutil


def c_compiler() -> str | None:
    """The C compiler to use: $CC, else cc, else gcc; None when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None
