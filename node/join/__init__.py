"""Joining a swarm: the start-up plan (resume, sync or fresh), state download from donors, peers files."""
