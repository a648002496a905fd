"""The discrete-event simulator that drives the real core over virtual time."""
