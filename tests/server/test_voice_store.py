"""VoiceStore shared by processes (Ray Serve replicas): whole voices only, never stale, one winner."""
import threading

import pytest
import torch

from misotts.server.voices import VoiceExists, VoiceStore


def codes(seed: int, frames: int = 5) -> torch.Tensor:
    return torch.randint(0, 2048, (frames, 4), generator=torch.Generator().manual_seed(seed))


def test_a_voice_written_by_one_store_is_read_whole_by_another(tmp_path):
    writer, reader = VoiceStore(tmp_path), VoiceStore(tmp_path)
    assert reader.get("anna") is None
    written = writer.add("anna", 2, "Hello, I am Anna.", codes(0))
    read = reader.get("anna")
    assert (read.name, read.speaker, read.transcript, read.frames, read.created) == \
        ("anna", 2, "Hello, I am Anna.", 5, written.created)
    assert torch.equal(read.codes, codes(0))
    assert [v.name for v in reader.list()] == ["anna"]


def test_a_voice_deleted_or_replaced_elsewhere_is_never_served_stale(tmp_path):
    a, b = VoiceStore(tmp_path), VoiceStore(tmp_path)
    a.add("anna", 1, "first", codes(1))
    assert b.get("anna").transcript == "first"  # b caches it
    assert a.delete("anna")
    assert b.get("anna") is None and b.list() == []
    a.add("anna", 3, "second", codes(2, frames=7))
    again = b.get("anna")
    assert (again.speaker, again.transcript, again.frames) == (3, "second", 7)
    assert torch.equal(again.codes, codes(2, frames=7))
    assert not b.delete("nobody") and not b.delete("../etc")


def test_one_name_registered_at_once_by_two_stores_has_one_winner(tmp_path):
    stores, results = [VoiceStore(tmp_path) for _ in range(4)], []
    start = threading.Barrier(len(stores))

    def register(i, store):
        start.wait()
        try:
            results.append(store.add("anna", i, f"take {i}", codes(i)).transcript)
        except VoiceExists:
            results.append(None)

    threads = [threading.Thread(target=register, args=(i, s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results if r is not None]
    assert len(results) == 4 and len(winners) == 1
    assert VoiceStore(tmp_path).get("anna").transcript == winners[0]  # the stored voice is the winner's, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anna.safetensors"]  # no temporary files left


def test_temporary_files_are_not_voices(tmp_path):
    store = VoiceStore(tmp_path)
    (tmp_path / ".anna.x1.tmp").write_bytes(b"half")
    assert store.list() == [] and store.get(".anna") is None
    with pytest.raises(ValueError):
        store.add("../anna", 0, "t", codes(0))


def test_an_unreadable_voice_file_is_absent_and_logged_once(tmp_path, caplog):
    store = VoiceStore(tmp_path)
    store.add("anna", 0, "t", codes(0))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)  # not a safetensors file
    bad = tmp_path / "shape.safetensors"
    VoiceStore(tmp_path).add("shape", 0, "t", codes(1))
    from safetensors.torch import save_file
    save_file({"codes": torch.zeros(3)}, bad, metadata={"name": "shape", "speaker": "0", "transcript": "t",
                                                        "created": "0.0"})  # 1-D codes: not a voice
    with caplog.at_level("WARNING", logger="misotts.server"):
        assert [v.name for v in store.list()] == ["anna"]
        assert store.get("broken") is None and store.get("shape") is None
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "'broken'" in m]) == 1 and len([m for m in said if "'shape'" in m]) == 1
    assert store.delete("broken") and store.get("broken") is None  # and it can be deleted


def test_a_name_must_match_whole(tmp_path):
    store = VoiceStore(tmp_path)
    with pytest.raises(ValueError):
        store.add("anna\n", 0, "t", codes(0))
    store.add("anna", 0, "t", codes(0))
    assert store.get("anna\n") is None and not store.delete("anna\n")
