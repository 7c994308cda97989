"""Exchange weights with the Hugging Face ecosystem (transformers, peft)."""
