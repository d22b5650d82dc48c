"""``python -m mlx_diffgemma.chat``: the command line lives in the cli package
(the library never imports it); ``mlx_diffgemma chat`` runs the same."""

from ..cli.chat import main

main()
