"""Loading pipelines, token positions of a concept in a prompt, and the fingerprint of a base model."""
