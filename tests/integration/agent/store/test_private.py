"""A ``file://`` store's directory belongs to the user jobmesh runs as, and no one else
gets in (but the Postgres OS user's group reads, when we are root)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jobmesh.agent.postgres import os_user, postgres_gid
from jobmesh.agent.store import StoreError, make_private, open_store, put_bytes

pytestmark = pytest.mark.timeout(60)


def reads(path: Path, user: str, gid: int) -> bool:
    """Whether ``user`` (in ``gid`` and its own groups, nothing of ours) can read it."""
    groups = os.getgrouplist(user, gid) if user != "nobody" else []
    run = subprocess.run(["cat", str(path)], user=user, group=gid, extra_groups=groups,
                         capture_output=True, timeout=30)
    return run.returncode == 0


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_store_is_made_private_and_a_loose_one_tightened(pg_root: Path) -> None:
    base = pg_root / f"private-{os.urandom(4).hex()}"  # (Postgres's user reaches pg_root)
    made, loose = base / "made" / "store", base / "loose"
    base.mkdir(mode=0o755)
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    (loose / "old").mkdir()
    (loose / "old" / "object").write_bytes(b"x")
    gid = postgres_gid()
    for root in (made, loose):
        store = open_store(f"file://{root}")
        make_private(store, gid)
        assert root.stat().st_uid == os.geteuid()
        if gid is None:  # one user runs everything: nobody else reads
            assert mode(root) == 0o700
        else:  # root: Postgres's restore_command reads WAL, and nothing else gets in
            assert mode(root) == 0o2750 and root.stat().st_gid == gid
        await put_bytes(store, "job/wal/segment", b"wal")
        if gid is not None:  # what is added is the group's, read only
            added = root / "job" / "wal" / "segment"
            assert added.stat().st_gid == gid and mode(added) & 0o077 == 0o040
    if gid is not None:
        old = loose / "old" / "object"
        assert old.stat().st_gid == gid  # (its own mode matters not: the top is 2750)
        user = os_user()
        assert user is not None
        assert await asyncio.to_thread(reads, old, user, gid)  # Postgres's user does
        assert not await asyncio.to_thread(reads, old, "nobody", 65534)  # anyone else not


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_store_another_user_owns_is_refused_in_one_line(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(StoreError, match=r"belongs to uid 65534, not to the user jobmesh runs"):
        make_private(open_store(f"file://{theirs}"))
    run = subprocess.run([sys.executable, "-m", "jobmesh", "controller", "--catalog-dsn",
                          "postgresql://nobody@127.0.0.1:1/none", "--state-dir",
                          str(tmp_path / "state"), "--store", f"file://{theirs}"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert f"the store {theirs} belongs to uid 65534" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert theirs.stat().st_uid == 65534  # left as it was
