"""The relay: the Aggregator service for the edge nodes of one site, the Uplink client of the aggregator."""
