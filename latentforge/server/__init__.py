"""`latentforge serve`: the HTTP API (A1111's routes and latentforge's job queue) and the web page.

app.py (routes, limits, models by name), a1111.py (A1111's request and response shapes), jobs.py (the
queue), web/index.html (the page, no CDN).
"""

from latentforge.server.app import Settings, build_app, running, serve

__all__ = ["Settings", "build_app", "running", "serve"]
