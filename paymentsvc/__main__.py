"""`python -m paymentsvc ...`: the same as the `paymentsvc` command."""

from paymentsvc.cli import main

main()
