"""Operator commands as libraries: the swarm status client, preflight checks (doctor), run reports."""
