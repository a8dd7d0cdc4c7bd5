"""ResBM swarm node: the model, the stage runtime, and (later layers) transport and the daemon."""
