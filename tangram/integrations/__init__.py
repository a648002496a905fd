"""Adapters that put Tangram's leases under other frameworks' calls.

``tangram.integrations.litellm``: a LiteLLM callback that leases a permit of a quota pool
before each call and releases it with the call's real token usage (the ``litellm`` extra).
``tangram.integrations.skyrl``: a SkyRL-Gym text environment base whose tool calls run
under leases of a shared synchronous Ray client and whose ``close()`` closes its
trajectory on the broker (the ``skyrl`` extra).
``tangram.integrations.verl``: verl agent-loop tools (``TangramSandboxTool``,
``TangramApiTool``) whose calls run under leases of the broker actor, registrable from
verl's tool-config YAML (the ``verl`` extra).
Each adapter imports its framework only when imported itself.
"""
