"""The recommendation question (PAPER.md step 8) as text and as token ids for the LLM."""
