# The command line lives in the cli package; the library never imports it.
from ..cli.server import main

main()
