"""A job's PostgreSQL settings that follow from its memory limit, and the per-job trims.

A memory limit alone turns a big ``shared_buffers`` or ``work_mem`` into OOM
kills: the settings must fit the limit. The shapes are pgtune's:
``effective_cache_size`` three quarters of the memory, ``maintenance_work_mem``
a sixteenth (16 MB to 1 GB), ``work_mem`` what is left after the buffers
shared among a few sorts per connection (1 MB to 64 MB). ``shared_buffers``
is an eighth, not pgtune's quarter: hundreds of mostly idle jobs share one
machine and the page cache, and what PostgreSQL sizes from it is touched at
start (WAL buffers are a 32nd of it, zeroed): a job with 256 MB of buffers
costs 28 MB PSS idle, with 128 MB 17 MB. At the default 1 GiB limit that is
PostgreSQL's own default of 128 MB.

And per job, since hundreds run on one machine: no logical replication
launcher (a process a job that subscribes to nothing does not need; jobs
read each other through the router, not by replication).
"""

from __future__ import annotations

MB = 2**20
TRIMS = {"max_logical_replication_workers": "0"}


def memory_settings(memory: int | None, max_connections: int = 100) -> dict[str, str]:
    """Settings for a job limited to ``memory`` bytes (None: PostgreSQL's own defaults)."""
    if memory is None:
        return {}
    shared = max(16 * MB, memory // 8)
    work = min(max(MB, (memory - shared) // (max_connections * 4)), 64 * MB)
    maintenance = min(max(16 * MB, memory // 16), 1024 * MB)
    return {"shared_buffers": f"{shared // MB}MB",
            "effective_cache_size": f"{max(shared, memory * 3 // 4) // MB}MB",
            "work_mem": f"{work // 1024}kB",
            "maintenance_work_mem": f"{maintenance // MB}MB"}
