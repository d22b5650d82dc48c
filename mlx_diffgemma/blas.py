"""Which BLAS MLX's CPU backend calls, and how to get a fast one on Linux.

On a Mac the CPU backend uses Accelerate (and generation runs on Metal
anyway). On Linux the mlx[cpu] wheel bundles a reference BLAS, about 40x
slower than OpenBLAS for float32 matrix products; preloading the system's
OpenBLAS makes its symbols win.
"""

import os
import sys
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
FIX = f"apt-get install libopenblas0-pthread, then run with LD_PRELOAD={OPENBLAS}"
_OPTIMIZED = ("openblas", "mkl", "blis", "atlas")


def _mapped_libraries() -> List[str]:
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    return sorted({line.split()[-1] for line in lines if len(line.split()) >= 6})


def describe() -> str:
    """The BLAS this process' MLX calls, in a few words."""
    if sys.platform == "darwin":
        return "Accelerate"
    preloaded = [p for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if "blas" in p.lower()]
    if not preloaded:
        return "MLX's bundled BLAS (nothing preloaded)"
    # Name the library behind the preloaded libblas.so.3 (e.g. libopenblasp-r0.3.21.so).
    directory = str(Path(preloaded[0]).resolve().parent)
    behind = sorted({Path(p).name for p in _mapped_libraries() if p.startswith(directory) and "openblas" in p})
    return f"preloaded {preloaded[0]}" + (f" ({', '.join(behind)})" if behind else "")


def _preloaded_optimized() -> bool:
    for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        paths = (p.lower(), str(Path(p).resolve()).lower())
        if any(name in path for path in paths for name in _OPTIMIZED):
            return True
    return False


def slow_blas_advice() -> Optional[str]:
    """One line on how to make MLX's CPU backend fast, when it runs on the
    wheel's bundled reference BLAS on Linux; None otherwise.

    Cheap: this process' memory map shows the bundled library (mlx_cpu.libs/
    libblas-*.so), and LD_PRELOAD whether an optimized one takes its place.
    (numpy's own OpenBLAS, mapped too, is not the one MLX calls.)
    """
    if sys.platform != "linux" or mx.default_device().type != mx.DeviceType.cpu:
        return None
    bundled = any("mlx_cpu.libs" in p and "libblas" in Path(p).name for p in _mapped_libraries())
    if not bundled or _preloaded_optimized():
        return None
    return (
        f"note: MLX's CPU backend is using its bundled reference BLAS, about 40x slower than OpenBLAS; for speed, {FIX}"
    )
