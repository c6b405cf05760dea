"""The `gossiptrain` command line: one verb per module, each a thin shell over the library."""
