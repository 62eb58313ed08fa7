"""Read models, sinks and the query API built from the event log."""
