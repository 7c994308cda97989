"""Looking inside a model: embeddings, attention maps, the logit lens, attributions."""
