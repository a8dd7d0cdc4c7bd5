"""Pure PyTorch ResBM: no transport, DHT or CLI imports below this package.

Import the modules themselves (node.model.config is torch-free, so configs and the CLI load
without torch)."""
