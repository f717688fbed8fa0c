"""DiffEx train."""
