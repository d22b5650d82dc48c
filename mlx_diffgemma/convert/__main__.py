"""``python -m mlx_diffgemma.convert``: the command line lives in the cli package
(the library never imports it); ``mlx_diffgemma convert`` runs the same."""

from ..cli.convert import main

main()
