"""ResBM command line and benchmarks: the top layer, above node/ and coordinator/."""
