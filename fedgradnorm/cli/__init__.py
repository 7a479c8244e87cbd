"""The one `fedgradnorm` command, on top of the library and the services (which it imports lazily)."""

from fedgradnorm.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
