"""A user's memory: preferences (docs/architecture.md, "Context and memory").

Imports only the kernel and the Kafka plumbing, so the gateway (which writes memory) and the
workers (which read it into prompts) share one definition of it.
"""
