"""The ``mmwb`` command: one verb per module, each thin (parse, call the library, print)."""
