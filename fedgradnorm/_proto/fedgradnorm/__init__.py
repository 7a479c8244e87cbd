"""Generated protobuf and gRPC stubs: fedgradnorm._proto.fedgradnorm. Do not edit; run ``make proto``."""
