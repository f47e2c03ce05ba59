"""Policies a route applies to a request's content, compiled once per config snapshot."""
