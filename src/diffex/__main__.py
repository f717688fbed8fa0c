"""``python -m diffex``: the same CLI as the ``diffex`` command."""

from diffex.cli import entry

if __name__ == "__main__":
    entry()
