"""Alembic migrations of the job database (run via `slimgpt db upgrade` or app.db.migrate)."""
