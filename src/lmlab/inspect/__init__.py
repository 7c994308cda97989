"""Looking inside a model: embeddings, attention, attributions."""
