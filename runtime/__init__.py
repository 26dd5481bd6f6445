"""The DAM runtime: artifact loading, planning, transformers integration."""
