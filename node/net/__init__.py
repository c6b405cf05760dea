"""The network under a node: p2pd start-up, identity, the DHT client, frame and tensor streams, membership."""
