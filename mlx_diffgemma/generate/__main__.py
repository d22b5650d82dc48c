"""``python -m mlx_diffgemma.generate``: the command line lives in the cli package
(the library never imports it); ``mlx_diffgemma generate`` runs the same."""

from ..cli.generate import main

main()
