"""``python -m mlx_diffgemma.lora``: the command line lives in the cli package
(the library never imports it); ``mlx_diffgemma lora`` runs the same."""

from ..cli.lora import main

main()
