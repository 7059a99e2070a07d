"""evomerge: evolve model-merge recipes."""

__version__ = "0.1.0"
