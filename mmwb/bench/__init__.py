"""Benchmarks that run mmwb and the reference implementation on the same weights, machine and threads.

Each benchmark module provides ``HELP``, ``add_arguments(parser)`` and ``run(args) -> dict``; results are
ratios mmwb/reference measured in the same process, never absolute numbers compared across machines.
"""
