"""The sans-I/O core: queue, scheduler, managers, leases and accounting.

Nothing under this package reads a clock, sleeps, awaits or does I/O: drivers pass the
time in and act on the decisions that come out.
"""
