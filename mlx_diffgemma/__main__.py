"""``python -m mlx_diffgemma <command>``: the dispatcher (``cli.main``)."""

from .cli.main import main

main()
