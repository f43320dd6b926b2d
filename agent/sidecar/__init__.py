"""The sidecar daemon beside a running job's PostgreSQL (``jobmesh agent serve``).

``daemon``: the ``Agent``, its state and operations (archiving, scheduled
base backups, pause, dump); ``api``: the aiohttp application in front of
it; ``serve``: the run loop that starts both and stops them cleanly. The
controller never imports this package (an import contract says so): it
speaks the HTTP API.
"""
