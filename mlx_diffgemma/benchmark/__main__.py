"""python -m mlx_diffgemma.benchmark: the command line lives in the cli package."""

from ..cli.benchmark import main

main()
