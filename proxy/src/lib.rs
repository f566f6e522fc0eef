//! rpc_proxy library (placeholder).
