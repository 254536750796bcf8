"""``python -m quantkit`` (and ``torchrun -m quantkit``) runs the CLI."""
from quantkit.cli.main import main

main()
