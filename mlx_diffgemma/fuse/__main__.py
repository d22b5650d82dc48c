"""``python -m mlx_diffgemma.fuse``: the command line lives in the cli package
(the library never imports it); ``mlx_diffgemma fuse`` runs the same."""

from ..cli.fuse import main

main()
