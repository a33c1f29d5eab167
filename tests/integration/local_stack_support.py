"""What the tests that bring up infra/local share: the stack's environment."""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def stack_env(state: pathlib.Path) -> dict[str, str]:
    """This process's environment plus the stack's (STATE/env, read as the demo reads it)."""
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        from _common import read_stack_env
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    return {**os.environ, **read_stack_env(str(state))}
