"""The machine a benchmark ran on, for its report."""

import os
import platform
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .. import blas


def _cpu_name() -> str:
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.check_output(["sysctl", "-n", "machdep.cpu.brand_string"], text=True).strip()
        except (OSError, subprocess.CalledProcessError):
            return platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> Optional[float]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> Optional[float]:
    """The 1-minute load average: other busy processes inflate every timing."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    device = mx.default_device()
    return dict(
        cpu=_cpu_name(),
        cores=os.cpu_count(),
        ram_gb=_ram_gb(),
        platform=f"{platform.system()} {platform.machine()}",
        mlx=mx.__version__,
        device="gpu (Metal)" if device.type == mx.DeviceType.gpu else "cpu",
        blas=blas.describe(),
        load_average_start=load_average(),
    )
