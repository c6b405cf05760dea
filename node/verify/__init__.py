"""Verification of peers: commitments, committee audits by replay, votes and flags; LSH signatures; test faults."""
