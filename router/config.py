"""The router's settings, as flags (``router.main``) or code (tests, ``jobmesh demo``) set them."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from jobmesh import defaults


@dataclass
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = defaults.ROUTER_PORT
    tls: ssl.SSLContext | None = None
    cert_pem: str | None = None  # for SCRAM channel binding (tls-server-end-point)
    require_tls: bool = False
    cleartext_over_tls: bool = False
    max_client_conn: int = 10_000
    startup_timeout: float = 10.0
    connect_timeout: float = 10.0
    shutdown_timeout: float = 30.0
    wake_timeout: float = defaults.WAKE_TIMEOUT  # a client waits this long for its job to wake
    activity_interval: float = 5.0  # how often the catalog hears which jobs are in use
    # Session mode keeps the backend connections clients leave, reset (pool.py): at most
    # pool_size idle per job (0: none kept), each for server_idle_timeout seconds at most.
    pool_size: int = 20
    server_idle_timeout: float = 60.0
    # Transaction mode (transaction.py): a pool_size per job and router process, shared by
    # its clients. A client waits query_wait_timeout for a backend at most (53300 then), is
    # told after query_wait_notify that it waits; each backend keeps at most
    # max_prepared_statements of its clients' named statements (least recently used go).
    query_wait_timeout: float = 120.0
    query_wait_notify: float = 5.0
    max_prepared_statements: int = 200
    lease_ttl: float = 30.0  # a job's slots leased from the catalog live this long (leases.py)
    # Worker mode (see supervisor.py): a socket inherited from the supervisor,
    # this worker's index, and the control directory the workers share.
    workers: int = 1
    worker_index: int = 0
    listen_fd: int | None = None
    control_dir: str | None = None
    # Many routers as one (fleet.py): where this router hears its peers' forwarded cancels,
    # the peers it asks (names resolved on every ask), and the secret they all share.
    peer_listen: tuple[str, int] | None = None
    peer_advertise: tuple[str, int] | None = None  # what peers reach (default peer_listen)
    peers: list[tuple[str, int]] = field(default_factory=list)
    peer_secret: bytes | None = None
