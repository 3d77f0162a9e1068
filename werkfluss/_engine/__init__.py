"""The engine: replay, execute and drive runs (rank 3; imports the store's Protocols, the context and pure modules)."""
