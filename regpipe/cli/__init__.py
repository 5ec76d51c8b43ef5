"""Layer 5: the ``regpipe`` command (one module per subcommand, the pictures and the reports)."""

from regpipe.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
