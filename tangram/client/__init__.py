"""Clients of a remote broker."""
