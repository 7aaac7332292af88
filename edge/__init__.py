"""edge-rag: INT4/INT8 engines for NVIDIA Jetson Orin and offline question answering."""

__version__ = "0.1.0"
