"""`python -m synthwatch` runs the CLI."""

from synthwatch.pipeline.cli import main

main()
