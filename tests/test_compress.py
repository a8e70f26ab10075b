"""Page batches compressed on the wire: the process continues exactly as without compression,
and fewer bytes travel for compressible memory."""
import pytest

from test_migrate import c_make, migrate_and_compare  # noqa: F401  (fixture)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compressed_migration(agent, registry, c_make, codec):
    _, _, info = migrate_and_compare(agent, registry, c_make("memory"), extra=("--compress", codec))
    assert info["wire_bytes"] < info["bytes"], f"{codec} did not shrink the memory workload's pages: {info}"


def test_loopback_default_is_uncompressed(agent, registry, c_make):
    _, _, info = migrate_and_compare(agent, registry, c_make("memory"))
    assert info["wire_bytes"] > info["bytes"], f"pages were compressed on loopback by default: {info}"
