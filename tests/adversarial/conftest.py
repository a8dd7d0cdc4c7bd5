"""The real middle-stage node on loopback that tests/loopback/test_node_inputs.py feeds."""

from tests.loopback.test_node_inputs import node  # noqa: F401  (the fixture)
