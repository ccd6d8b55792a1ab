"""kubetune-server: the OpenAI-compatible fine-tuning API, acting with the caller's own
Kubernetes identity (docs/api.md)."""
