import hashlib

import pytest

from farm.storage import Storage


def test_put_is_atomic_and_checksummed(tmp_path):
    storage = Storage(f"file://{tmp_path}/store")
    src = tmp_path / "a.bin"
    src.write_bytes(b"video bytes" * 1000)
    digest, size = storage.put_file(src, "jobs/j1/video.mp4")
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest() and size == 11000
    assert storage.exists("jobs/j1/video.mp4")
    assert [p.name for p in (tmp_path / "store/jobs/j1").iterdir()] == ["video.mp4"]  # no .part
    assert storage.local_path("jobs/j1/video.mp4").read_bytes() == src.read_bytes()
    storage.remove("jobs/j1/video.mp4")
    assert not storage.exists("jobs/j1/video.mp4")


@pytest.mark.parametrize("key", ["/etc/passwd", "jobs/../../etc/passwd"])
def test_keys_cannot_escape_the_root(tmp_path, key):
    with pytest.raises(ValueError, match="storage key"):
        Storage(f"file://{tmp_path}").exists(key)
