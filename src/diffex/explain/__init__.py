"""DiffEx explain."""
