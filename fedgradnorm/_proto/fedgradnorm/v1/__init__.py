"""Generated protobuf and gRPC stubs: fedgradnorm._proto.fedgradnorm.v1. Do not edit; run ``make proto``."""
