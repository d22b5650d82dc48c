"""``python -m mlx_diffgemma.edit``: the command line lives in the cli package
(the library never imports it); ``mlx_diffgemma edit`` runs the same."""

from ..cli.edit import main

main()
