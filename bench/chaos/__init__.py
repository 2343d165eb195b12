"""`make chaos`: mixed load on a 3-node cluster, 2 workers and 2 gateways under a seeded fault
schedule, then an exact accounting from the topics and the simulator's own records
(docs/architecture.md, "Production Kafka")."""
