"""The labeling app's server secret (the key of the HMACs of sessions, invites and CSRF tokens): read from
$CHATLOOP_LABEL_SECRET or a file generated owner-only on first use, and refused when empty, default or short."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from chatloop.errors import UserError

WEAK_SECRETS = {"", "secret", "changeme", "change-me", "change_me", "default", "password", "dev", "development",
                "insecure", "test", "admin", "chatloop", "please-change-me"}
MIN_SECRET = 32


def check_secret(value: str, where: str) -> str:
    value = value.strip()
    if value.lower() in WEAK_SECRETS or len(value) < MIN_SECRET:
        raise UserError(f"{where}: refusing to run with an empty, default or short secret (expected at least "
                        f"{MIN_SECRET} random characters; delete the file to have one generated)")
    return value


def load_secret(secret_file: str | Path) -> str:
    """The server secret: $CHATLOOP_LABEL_SECRET, else the file, generated (mode 0600) on first run."""
    if "CHATLOOP_LABEL_SECRET" in os.environ:
        return check_secret(os.environ["CHATLOOP_LABEL_SECRET"], "$CHATLOOP_LABEL_SECRET")
    path = Path(secret_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process generated it just now
            return check_secret(path.read_text(), str(path))
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return check_secret(path.read_text(encoding="utf-8"), str(path))
