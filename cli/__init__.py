"""The ``dam`` command-line interface (nothing imports it)."""
