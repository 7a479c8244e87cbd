"""The two gRPC services on top of the library: the aggregator and the edge node."""
