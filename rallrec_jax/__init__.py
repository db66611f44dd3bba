"""RALLRec in JAX/Flax: retrieval-augmented LLM recommendation."""

__version__ = "0.1.0"
