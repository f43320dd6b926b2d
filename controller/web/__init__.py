"""The status page: what an operator looks at (``/``, ``/jobs/<id>``), served by the
controller beside its API.

``pages.py`` has the handlers, ``guard.py`` what every request passes (Host, Origin,
security headers), ``sessions.py`` the logins kept in the catalog, ``limits.py`` the
login rate limit, ``data.py`` the catalog reads, ``summary.py`` the figures and words
shown, ``live.py`` the stream that keeps a page current; ``templates/`` and
``static/`` are served as they are (no build step, nothing from elsewhere).
"""
