"""The ParamCast gRPC service: batcher, core logic, error mapping, servicer and server factory."""
