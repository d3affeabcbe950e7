"""The SlimGPT job service: REST API, job records, live events. Never imports torch."""

__version__ = "0.1.0"
