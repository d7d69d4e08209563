"""loralab: an experiment-sweep research framework for LoRA."""
__version__ = "0.1.0"
