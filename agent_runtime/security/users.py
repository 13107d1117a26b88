"""Local users: argon2id password hashes in a mounted file, one ``name:role[,role]:hash`` per line.

``agent-runtime users add NAME --role ROLE --password-stdin`` prints such a line; a ``!`` before
the hash disables the user (as in /etc/shadow). There is no user list in code.

The file is a mounted Secret, which the kubelet replaces while the pod runs: it is read again
whenever it changed, so a removed, disabled or re-roled user takes effect at the next login or
refresh.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

USERNAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
ROLE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MAX_PASSWORD_BYTES = 1024
_HASHER = PasswordHasher()  # argon2id with the library's (RFC 9106 low-memory) parameters
# Unknown users are checked against this, so they cost the same time as a wrong password.
_DUMMY_HASH = _HASHER.hash("not a real password: equalises the time of unknown users")
DISABLED = "!"
log = logging.getLogger("agent_runtime.users")


@dataclass(frozen=True)
class User:
    name: str
    roles: tuple[str, ...]
    password_hash: str
    disabled: bool = False


class UsersFileError(ValueError):
    pass


def hash_line(name: str, roles: list[str], password: str) -> str:
    if not USERNAME.match(name):
        raise UsersFileError(f"user name {name!r} must match {USERNAME.pattern}")
    for role in roles:
        if not ROLE.match(role):
            raise UsersFileError(f"role {role!r} must match {ROLE.pattern}")
    if not password or len(password.encode()) > MAX_PASSWORD_BYTES:
        raise UsersFileError(f"the password must be 1 to {MAX_PASSWORD_BYTES} bytes")
    return f"{name}:{','.join(roles)}:{_HASHER.hash(password)}"


def parse_users(text: str, source: str = "users") -> dict[str, User]:
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":", 2)
        disabled = len(parts) == 3 and parts[2].startswith(DISABLED)
        if disabled:
            parts[2] = parts[2].removeprefix(DISABLED)
        if len(parts) != 3 or not parts[2].startswith("$argon2id$"):
            raise UsersFileError(f"{source}:{number}: expected name:roles:$argon2id$... ")
        name, roles, password_hash = parts
        if not USERNAME.match(name) or not all(ROLE.match(r) for r in roles.split(",")):
            raise UsersFileError(f"{source}:{number}: bad user name or role")
        if name in users:
            raise UsersFileError(f"{source}:{number}: user {name!r} is listed twice")
        users[name] = User(name, tuple(roles.split(",")), password_hash, disabled)
    return users


# What identifies one version of the file: the kubelet swaps a Secret's files in by renaming a new
# directory into place, so the inode changes; size and mtime catch an edit in place.
_Version = tuple[int, int, int, int] | None


def _version(path: Path) -> _Version:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class UserStore:
    def __init__(self, users: dict[str, User], path: Path | None = None) -> None:
        self._users = users
        self._path = path
        self._version = _version(path) if path is not None else None

    @classmethod
    def load(cls, path: str | None) -> UserStore:
        """The users in the file (none when there is no file); an unreadable file is an error."""
        if path is None:
            return cls({})
        file = Path(path)
        return cls(parse_users(file.read_text(), str(file)) if file.exists() else {}, file)

    def _current(self) -> dict[str, User]:
        """The users as the file says now, read again when it changed since the last look."""
        if self._path is None:
            return self._users
        version = _version(self._path)
        if version != self._version:
            self._version = version
            try:
                text = self._path.read_text() if version is not None else ""
                self._users = parse_users(text, str(self._path))
            except (OSError, UnicodeDecodeError, UsersFileError) as error:
                # Fail closed: keeping the old list would keep a user someone just removed.
                log.error("users file %s is unusable, nobody can log in until it is fixed: %s", self._path, error)
                self._users = {}
        return self._users

    def __len__(self) -> int:
        return len(self._current())

    def get(self, name: str) -> User | None:
        """The user if listed and not disabled, as the file says now."""
        user = self._current().get(name)
        return user if user is not None and not user.disabled else None

    async def authenticate(self, name: str, password: str) -> User | None:
        """The user when the password is right, else None. Unknown users and wrong passwords
        take the same path and time (an argon2 verification either way), off the event loop;
        so do disabled users, who never get in."""
        user = self._current().get(name)
        candidate = user.password_hash if user else _DUMMY_HASH
        ok = await asyncio.to_thread(_verify, candidate, password)
        return user if ok and user is not None and not user.disabled else None


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
