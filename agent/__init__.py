"""The agent: everything beside one job's PostgreSQL that keeps its data durable.

Two halves. The library (this package's modules: ``store``, ``manifest``,
``tarstream``, ``walnames``, ``wal``, ``postgres``, ``postmaster``, ``init``,
``snapshot``, ``basebackup``, ``restore``, ``dump``, ``inventory``,
``verify``, ``prune``) is what the controller may import. ``sidecar`` is
the long-running daemon and its HTTP API, which the controller only talks
to over HTTP; ``cli`` is the ``jobmesh agent ...`` command line over both.
"""
