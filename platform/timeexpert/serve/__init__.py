"""Serving: the Ray Serve deployment classes used by serve_apps/."""
