"""`make bench`: Switchyard against a direct upstream, nginx and LiteLLM's proxy (see docs/performance.md)."""
