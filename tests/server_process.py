"""A server subprocess on 127.0.0.1, started as a user starts it, for the server tests."""

import os
import re
import subprocess
import sys
import threading
from typing import Tuple


def launch(model: str, cwd, *args, **env) -> Tuple[subprocess.Popen, str]:
    """``python -m mlx_diffgemma.server --model MODEL --port 0 ARGS`` run in ``cwd``
    (``env`` added to the environment); the process and its base URL once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_diffgemma.server", "--model", model, "--port", "0", "--log-level", "WARNING"]
        + list(args),
        cwd=cwd,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r} {proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    return proc, f"http://127.0.0.1:{match.group(1)}"
