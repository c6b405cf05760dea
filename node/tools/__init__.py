"""Local tools on top of the node: the multi-process swarm launcher, the chaos harness, process helpers."""
