"""Whether progress bars show: the caller's `progress` flag, and the user's TQDM_DISABLE.

tqdm reads TQDM_DISABLE only for arguments a caller leaves unset, and offsite always passes
`disable=`, so the variable is honoured here (`offsite --quiet` sets it for the whole command).
"""

from __future__ import annotations

import os

_OFF = ("1", "true", "yes", "on")


def bars_disabled(progress: bool = True) -> bool:
    return not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() in _OFF
