"""HTTP layer: routes, dependencies, error handling, middleware."""
