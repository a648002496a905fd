"""The paper's baselines that are not scheduling policies of the core, one module each.

Each is modelled with the paper fact it rests on; what the paper does not say is marked
"assumed" and documented in docs/benchmarks.md.

- ``k8s_pod``: ``k8s-pod``, one Kubernetes pod per trajectory, placed by request.
- ``static``: ``static``, every GPU service on GPUs of its own (a configuration of the
  core, not another scheduler).
- ``naive_api``: ``naive-api``, trajectories call rate-limited APIs directly and retry.
"""
