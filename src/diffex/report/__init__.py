"""DiffEx report."""
