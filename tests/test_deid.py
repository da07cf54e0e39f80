"""De-identification: the salted hash and the salt file (planted identifiers: reliability/test_leaks.py)."""
import os


def test_hash_is_keyed_by_the_secret_salt():
    from medtl.data.deid import salted_hash

    a, b = salted_hash(b"salt-one-0123456789", "MRN0000001"), salted_hash(b"salt-two-0123456789", "MRN0000001")
    assert a != b and len(a) == 20 and "MRN" not in a


def test_salt_file_created_private(tmp_path, monkeypatch):
    from medtl.data import deid

    monkeypatch.delenv("MEDTL_ID_SALT", raising=False)
    monkeypatch.setattr(deid, "DEFAULT_SALT_FILE", str(tmp_path / "cfg" / "id_salt"))
    salt = deid.load_salt()
    assert len(salt) >= 32 and deid.load_salt() == salt
    assert oct(os.stat(tmp_path / "cfg" / "id_salt").st_mode & 0o777) == "0o600"
