"""The `miles` command line: thin Typer commands over `miles_core` (no algorithm code here)."""
