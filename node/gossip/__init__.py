"""Random-pair gossip: whom to pair with (pure rules) and the pair exchange at each round boundary."""
