"""De-identification: salted hashes stand in for patient and file identities.

The salt is a secret kept outside the outputs (env MEDTL_ID_SALT, a salt file,
or ~/.config/medtl/id_salt created on first use), so a hash cannot be reversed
by hashing a list of candidate MRNs. The same salt gives the same hashes, which
keeps re-ingest byte-identical.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from medtl.errors import MedtlError

SALT_ENV = "MEDTL_ID_SALT"
DEFAULT_SALT_FILE = os.path.join(os.path.expanduser("~"), ".config", "medtl", "id_salt")


def load_salt(salt_file: str | None = None) -> bytes:
    """The ID salt: $MEDTL_ID_SALT, else `salt_file`, else the per-user default (created if absent)."""
    env = os.environ.get(SALT_ENV)
    if env:
        return env.encode()
    path = salt_file or DEFAULT_SALT_FILE
    if os.path.exists(path):
        with open(path, "rb") as fh:
            salt = fh.read().strip()
        if len(salt) < 16:
            raise MedtlError(f"salt file {path} holds fewer than 16 bytes; delete it or write a longer secret")
        return salt
    if salt_file:
        raise MedtlError(f"salt file {salt_file} does not exist; create it with a secret of 16+ bytes")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    salt = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(salt)
    return salt


def salted_hash(salt: bytes, value: str, length: int = 20) -> str:
    """HMAC-SHA256 of `value` under `salt`, hex, truncated to `length` characters."""
    return hmac.new(salt, value.encode("utf-8"), hashlib.sha256).hexdigest()[:length]


# Names shorter than this are left in messages: they cannot single out a patient, and replacing
# every "1" or "ct" in a decoder's message would garble it. Whole paths are always replaced.
_MIN_REDACTED_NAME = 4


def redact(text: str, relative_path: str, root: str = "") -> str:
    """`text` with the names a study's path is made of replaced by `<study>`: the path (joined to
    `root` as given and absolute), and each folder name, file name and file stem in `relative_path`.
    Decoder messages can quote the file they failed on; this keeps them to the salted id."""
    forms = {relative_path, os.path.join(root, relative_path), os.path.abspath(os.path.join(root, relative_path))}
    for part in relative_path.replace("\\", "/").split("/"):
        forms.update({part, os.path.splitext(part)[0]})
    for form in sorted((f for f in forms if len(f) >= _MIN_REDACTED_NAME), key=len, reverse=True):
        text = text.replace(form, "<study>")
    return text
