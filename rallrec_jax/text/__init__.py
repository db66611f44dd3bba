"""Item text through the LLM: generated descriptions (describe) and text embeddings (embed)."""
