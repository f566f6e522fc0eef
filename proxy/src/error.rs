//! Why a call failed, classified once (pingora's upstream/downstream/local split), and how
//! each failure reaches the caller as the `TApplicationException` of CONTRACT section 2.

use rpc_frame::ExceptionCode;

use crate::resilience::Verdict;

/// A call that will not get its upstream reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The service is not in ZooKeeper.
    #[error("Service: {service} Not Found")]
    UnknownService {
        /// The service asked for.
        service: String,
    },
    /// The service exists but has no endpoint that can take a call now.
    #[error("Worker FOR {service}.{method} Not Found{detail}")]
    NoEndpoint {
        /// The service.
        service: String,
        /// The method.
        method: String,
        /// Extra words, with a leading separator, or empty.
        detail: String,
    },
    /// The call reached (or was queued for) an endpoint and failed there.
    #[error("Service: {service}, Method: {method}, Endpoint: {endpoint}, Error: {cause}")]
    Upstream {
        /// The service.
        service: String,
        /// The method.
        method: String,
        /// The endpoint's address.
        endpoint: String,
        /// What went wrong.
        cause: UpstreamFailure,
    },
    /// A limit of this proxy was hit.
    #[error("Service: {service}, Method: {method}, Error: {cause}")]
    Overloaded {
        /// The service.
        service: String,
        /// The method.
        method: String,
        /// Which limit.
        cause: &'static str,
    },
    /// The frame was not a usable call.
    #[error("{0}")]
    Protocol(String),
}

/// Why an upstream call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamFailure {
    /// No reply within `request_timeout_ms`.
    #[error("timeout, no reply within the request timeout")]
    Timeout,
    /// The connection broke after the call was written.
    #[error("connection to the endpoint lost")]
    ConnectionLost,
    /// The endpoint went silent past the heartbeat timeout.
    #[error("endpoint heartbeat timeout")]
    HeartbeatTimeout,
    /// The reply named another method than the call.
    #[error("bad reply: method name does not match the call")]
    BadReply,
    /// The connection could not be made.
    #[error("cannot connect to the endpoint")]
    ConnectFailed,
    /// The proxy is stopping and the call could not finish in the grace period.
    #[error("proxy stopping")]
    Stopping,
    /// The endpoint accepted no byte of a pending write for `write_timeout_ms`.
    #[error("endpoint stopped reading (write timeout)")]
    WriteTimeout,
    /// The reply was larger than `max_frame_size` (skipped; the connection goes on).
    #[error("reply larger than max_frame_size")]
    ReplyTooLarge,
}

impl UpstreamFailure {
    /// What the failure says about the endpoint, for outlier ejection (CONTRACT section 9):
    /// a counted failure, an answer (a reply too large is the handler's doing), or nothing
    /// (the proxy is stopping).
    pub fn verdict(self) -> Option<Verdict> {
        match self {
            UpstreamFailure::Timeout
            | UpstreamFailure::ConnectionLost
            | UpstreamFailure::HeartbeatTimeout
            | UpstreamFailure::BadReply
            | UpstreamFailure::ConnectFailed
            | UpstreamFailure::WriteTimeout => Some(Verdict::Failed),
            UpstreamFailure::ReplyTooLarge => Some(Verdict::Answered),
            UpstreamFailure::Stopping => None,
        }
    }
}

impl CallError {
    /// The `TApplicationException` code sent to the caller.
    pub fn code(&self) -> ExceptionCode {
        match self {
            CallError::UnknownService { .. } => ExceptionCode::Unknown,
            CallError::Protocol(_) => ExceptionCode::ProtocolError,
            _ => ExceptionCode::InternalError,
        }
    }

    /// Short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::UnknownService { .. } => "unknown_service",
            CallError::NoEndpoint { .. } => "no_endpoint",
            CallError::Upstream { cause, .. } => match cause {
                UpstreamFailure::Timeout => "timeout",
                UpstreamFailure::ConnectionLost => "connection_lost",
                UpstreamFailure::HeartbeatTimeout => "heartbeat_timeout",
                UpstreamFailure::BadReply => "bad_reply",
                UpstreamFailure::ConnectFailed => "connect_failed",
                UpstreamFailure::Stopping => "stopping",
                UpstreamFailure::WriteTimeout => "write_timeout",
                UpstreamFailure::ReplyTooLarge => "reply_too_large",
            },
            CallError::Overloaded { .. } => "overloaded",
            CallError::Protocol(_) => "protocol",
        }
    }
}
