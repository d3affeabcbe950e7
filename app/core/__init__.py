"""Settings, logging and security helpers shared by the API, the CLI and the worker."""
