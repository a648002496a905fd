"""The paper's baselines that are not scheduling policies of the core, one module each.

Each is modelled with the paper fact it rests on; what the paper does not say is marked
"assumed" and documented in docs/benchmarks.md.

- ``k8s_pod``: ``k8s-pod[:OPT,...]``, one Kubernetes pod per trajectory, placed by
  request as the default kube-scheduler scores nodes (``k8s-pod:pack``: packed), started
  at a bounded rate, an exec cost per action, its CPU limit and node contention applied
  to the action's own efficiency curve.
- ``static``: ``static``, every GPU service on GPUs of its own (a configuration of the
  core, not another scheduler).
- ``naive_api``: ``naive-api``, trajectories call rate-limited APIs directly and retry.
- ``client_bucket``: ``client-bucket[:OPT,...]``, the same, each trajectory pacing its
  calls to its share of every API's limits.

docs/benchmarks.md, "Baselines: what they model and where each figure comes from",
gives the source of every figure.
"""
