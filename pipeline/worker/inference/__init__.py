"""The inference engine: ``engine`` (scheduling, deadlines, cancel), ``runs`` (a request's
lifecycle), ``attempts`` (upstream calls, retries, resume), ``publishing`` (its TokenEvents),
``upstream`` (the client with its breaker, retry budget and scheduler, one per worker)."""
