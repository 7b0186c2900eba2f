"""miles core library: everything the `miles` CLI does lives here, importable without the CLI.

This package root stays import-light (no torch) so that `miles --help` is instant.
"""

__version__ = "0.1.0"
