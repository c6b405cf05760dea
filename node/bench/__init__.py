"""Benchmarks that print figures: pair exchange, state sync, verification (never imported by the daemon)."""
