"""gossiptrain: a peer-to-peer decentralized training node."""

__version__ = "0.1.0"
