"""DiffEx data."""
