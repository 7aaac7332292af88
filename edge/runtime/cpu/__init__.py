"""The native CPU backend (`--backend native`): edge-rag's own decode step for llama-family
decoders in C (csrc/native.c), compiled with the system cc at first use (build.py), driven
through ctypes (abi.py) by NativeBackend (backend.py) over weights repacked for its int4 x int8
kernels (weights.py)."""
