"""The JSON-safe privacy state of a site and its file I/O.

A state dict (format ``STATE_FORMAT``: the accountant history [(σ, q, steps), ...], the planned
σ and per-round ε) is what ``PrivacySession.state_dict()`` returns and what the next round's
session starts from; it travels in Flower's ``context.state`` as text and is written atomically
to a site-local file so the budget survives restarts. Kept apart from ``common.privacy`` because
it is plain JSON and file handling, with no torch or Opacus dependency. ``common.privacy``
re-exports the public names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from common.atomic import atomic_write

STATE_FORMAT = 1


def state_to_text(state: Mapping[str, Any]) -> str:
    """JSON text of a session state (for a Flower ``ConfigRecord`` string value)."""
    return json.dumps(state, sort_keys=True)


def state_from_text(text: str, where: str = "privacy state") -> dict[str, Any]:
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from exc
    _check_state(state, where)
    return state


def _check_state(state: Any, where: str) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{where}: not a privacy state of format {STATE_FORMAT}")
    hist = state.get("history")
    if not isinstance(hist, list) or not all(isinstance(h, list) and len(h) == 3 for h in hist):
        raise ValueError(f"{where}: 'history' must be a list of [sigma, q, steps]")


def save_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Atomically write a state file (temp file in the same folder, fsync, rename)."""
    return atomic_write(path, lambda fh: fh.write(state_to_text(state)))


def load_state(path: str | Path) -> dict[str, Any] | None:
    """The state stored at ``path``; None when there is no file yet (errors name the file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return state_from_text(text, str(path))


def total_steps(state: Mapping[str, Any] | None) -> int:
    return 0 if not state else sum(int(h[2]) for h in state.get("history", []))


def most_spent(*states: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Of several copies of a site's state (``context.state``, the site file), the one with the
    most accounted steps: when they disagree, the larger ε is the safe one to continue from."""
    found = [dict(s) for s in states if s]
    return max(found, key=total_steps) if found else None
