"""code_version: the commit and dirtiness that results files record."""
import subprocess

from misotts.bench import provenance


def test_code_version_names_this_checkout():
    head = subprocess.run(["git", "-C", str(provenance.ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    version = provenance.code_version()
    if head.returncode != 0:  # a copy of the tree without .git
        assert version["source"] in ("env", "unknown")
        return
    assert version == {**version, "commit": head.stdout.strip(), "source": "git"}
    status = subprocess.run(["git", "-C", str(provenance.ROOT), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True).stdout
    assert version["dirty"] is bool(status.strip())


def test_without_git_the_sender_names_the_commit(monkeypatch):
    monkeypatch.setattr(provenance, "_git", lambda *args: None)
    monkeypatch.delenv("MISOTTS_GIT_COMMIT", raising=False)
    assert provenance.code_version() == {"commit": None, "dirty": None, "source": "unknown"}
    monkeypatch.setenv("MISOTTS_GIT_COMMIT", "ab" * 20)
    monkeypatch.setenv("MISOTTS_GIT_DIRTY", "1")
    assert provenance.code_version() == {"commit": "ab" * 20, "dirty": True, "source": "env"}
    monkeypatch.setenv("MISOTTS_GIT_DIRTY", "0")
    assert provenance.code_version()["dirty"] is False
