"""Data sources, one per file; each registers a loader in :data:`mlaudit.data.registry.SOURCES`."""
