"""The ``ferry`` command and the pieces it assembles services from."""
