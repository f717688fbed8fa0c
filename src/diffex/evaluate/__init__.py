"""DiffEx evaluate."""
