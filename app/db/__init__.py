"""Job database: typed models, engine/session factory, migrations helper."""
