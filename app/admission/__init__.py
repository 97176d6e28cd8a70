"""Admission: the slots and queue in front of the upstream, and the per-key rate limit, in process or in Redis."""
