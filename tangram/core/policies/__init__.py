"""Scheduling policies, one file each: ``base`` (the interface, and FCFS at the minimum),
``fixed`` (a fixed degree of parallelism), ``elastic`` (the paper's algorithm). The
names users write (``min``, ``fixed:K``, ``tangram``) are parsed in tangram.core.policy."""
