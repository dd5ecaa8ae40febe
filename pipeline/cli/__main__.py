"""`python -m pipeline.cli ...` is the `clipline` command."""

from pipeline.cli.main import entrypoint

entrypoint()
