"""The names every definition shares: partitions, concurrency pools and job names per spec.

One layer above the domain library (mlops/) and below the assets, sensors and schedules, so
those import it and never orchestration/ (which imports them).
"""
