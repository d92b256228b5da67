"""CPU kernels for the decoder's decode steps: ``cpu.c`` and its ctypes binding ``cpu.py``."""
