"""`python -m linearize`: runs the command-line interface (`linearize.cli.main`)."""

from linearize.cli import main

main()
