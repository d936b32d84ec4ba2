"""Feature service: online features with freshness statuses, point-in-time training sets."""
