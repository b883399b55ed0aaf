"""Logs, progress and heartbeat, watchdog and signals: what lets a person trust a run from afar."""
