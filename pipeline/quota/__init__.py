"""The per-user quota ledger over the `quota` topic: the pure verdicts (``state``) and the
Kafka side (``ledger``). Shared by the gateway and the preprocess stage, so it sits between
the kafka layer and both of them (docs/architecture.md, "Layers")."""
