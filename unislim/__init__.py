"""unislim."""
