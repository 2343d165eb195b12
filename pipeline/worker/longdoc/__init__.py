"""Long documents: the plan, the map-reduce calls as records, and the reduce step
(docs/architecture.md, "Long documents")."""
