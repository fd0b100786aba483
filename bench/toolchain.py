"""What `torch.compile` needs from the machine at run time, checked in milliseconds before minutes are
spent on a compile that cannot finish: inductor writes C++ for the CPU and Triton builds a small C
launcher for every CUDA kernel, both with the system's compiler against Python's own headers. A
machine with Python but without its development headers (a slim image, a bare GPU node) fails only
at the first compiled step."""
from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

# The compilers each back end looks for when $CC / $CXX is not set (Triton: cc, gcc, clang; inductor's
# C++: the C++ front ends).
COMPILERS = {"cuda": ("CC", ("cc", "gcc", "clang")), "cpu": ("CXX", ("c++", "g++", "clang++"))}


def compile_toolchain_missing(device_type: str) -> str | None:
    """Why torch.compile cannot build its kernels for `device_type` ("cuda" or "cpu") here, or None."""
    variable, names = COMPILERS["cuda" if device_type == "cuda" else "cpu"]
    chosen = os.environ.get(variable)
    if chosen and not shutil.which(chosen):
        return f"torch.compile needs a C compiler: ${variable}={chosen} is not an executable on PATH"
    if not chosen and not any(shutil.which(name) for name in names):
        return (f"torch.compile needs a C compiler at run time and none of {', '.join(names)} is on PATH "
                f"(nor ${variable} set)")
    include = sysconfig.get_paths().get("include") or ""
    if not (Path(include) / "Python.h").is_file():
        return (f"torch.compile needs Python's development headers at run time: no Python.h in {include or '?'} "
                "(install python3-dev or the matching headers)")
    return None
