"""What lets a person trust a run from afar: logs, progress and heartbeat, the watchdog."""
