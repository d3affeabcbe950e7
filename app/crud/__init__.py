"""Database operations shared by the API and the worker (all take a Session first)."""
