"""The SlimGPT job service: REST API, job records, live events. Never imports torch."""
