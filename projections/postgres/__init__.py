"""PostgreSQL projections: the live figures, per-subject state and the tracking record (DESIGN §4)."""
