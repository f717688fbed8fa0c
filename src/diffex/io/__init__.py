"""Reading and writing run files: checkpoints, JSON, atomically."""
