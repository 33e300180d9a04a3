"""The code location: every asset, job, schedule, sensor and resource of SynPref."""

from jobs.definitions import defs  # noqa: F401
