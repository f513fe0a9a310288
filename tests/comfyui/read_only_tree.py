"""What tests changed in a folder they must only read (the ComfyUI tree): files and folders added, removed or
modified (size or modification time; a folder's time changes when entries are made or deleted in it)."""

import os
from pathlib import Path


def snapshot(root):
    """{path relative to root: (kind, size, mtime_ns)} of every file and folder under root."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            kind = "folder" if path.is_dir() and not path.is_symlink() else "file"
            state[str(path.relative_to(root))] = (kind, info.st_size if kind == "file" else 0, info.st_mtime_ns)
    return state


def changes(before, after):
    """'added P' / 'removed P' / 'modified P' for every difference between two snapshots."""
    added = [f"added {p}" for p in sorted(after.keys() - before.keys())]
    removed = [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    modified = [f"modified {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return added + removed + modified
