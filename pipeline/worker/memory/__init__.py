"""Memory in the stages: preferences applied by preprocess (docs/architecture.md, "Context
and memory")."""
