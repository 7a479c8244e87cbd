"""Generated protobuf and gRPC stubs: fedgradnorm._proto. Do not edit; run ``make proto``."""
