"""Read models: SQL migrations, the PostgreSQL projectors, positions and lag."""
