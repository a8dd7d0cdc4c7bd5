"""The swarm layer: DHT records, replicas, replay (issue #4). Pure modules first."""
