"""The farm's application layer: settings, database, API, Celery tasks, storage, CLI."""
