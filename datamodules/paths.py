"""Path options as users type them: ``~`` and ``$VARIABLES`` expanded wherever a path is read (here, in the
lowest layer, because dataset roots are the first paths a run reads; the framework uses it too)."""

from __future__ import annotations

import os
from pathlib import Path


def expand_path(path: str | os.PathLike) -> Path:
    """``'~/data/$USER'`` -> ``/home/me/data/me`` (unknown variables stay as written)."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))
