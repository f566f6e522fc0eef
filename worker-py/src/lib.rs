//! rpc_thrift worker extension (placeholder while it is being written).
