//! Stable error codes shared by the client protocol's `error` frames and WebSocket closes.

use std::fmt;

/// Every error a client can be sent. The string form is part of the protocol: clients
/// switch on it, so a code is never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidJson,
    InvalidFrame,
    UnknownType,
    BinaryUnsupported,
    InvalidRecipient,
    RateLimited,
    AlreadyConnected,
    FrameTooLarge,
    InvalidUtf8,
    ProtocolError,
    ConnectRequired,
    ConnectTimeout,
    UnknownApp,
    TokenMissing,
    TokenMalformed,
    TokenAlgorithm,
    TokenSignature,
    TokenExpired,
    TokenNotYetValid,
    TokenClaims,
    AuthRejected,
    AuthUnavailable,
    Denied,
    FilterFailed,
    TooManyConnections,
    TooManyDevices,
    SlowConsumer,
    IdleTimeout,
    ServerShutdown,
    NodeDraining,
    InvalidChannel,
    TooManyChannels,
    PublishForbidden,
    Internal,
}

impl ErrorCode {
    pub const fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            InvalidJson => "invalid_json",
            InvalidFrame => "invalid_frame",
            UnknownType => "unknown_type",
            BinaryUnsupported => "binary_unsupported",
            InvalidRecipient => "invalid_recipient",
            RateLimited => "rate_limited",
            AlreadyConnected => "already_connected",
            FrameTooLarge => "frame_too_large",
            InvalidUtf8 => "invalid_utf8",
            ProtocolError => "protocol_error",
            ConnectRequired => "connect_required",
            ConnectTimeout => "connect_timeout",
            UnknownApp => "unknown_app",
            TokenMissing => "token_missing",
            TokenMalformed => "token_malformed",
            TokenAlgorithm => "token_algorithm",
            TokenSignature => "token_signature",
            TokenExpired => "token_expired",
            TokenNotYetValid => "token_not_yet_valid",
            TokenClaims => "token_claims",
            AuthRejected => "auth_rejected",
            AuthUnavailable => "auth_unavailable",
            Denied => "denied",
            FilterFailed => "filter_failed",
            TooManyConnections => "too_many_connections",
            TooManyDevices => "too_many_devices",
            SlowConsumer => "slow_consumer",
            IdleTimeout => "idle_timeout",
            ServerShutdown => "server_shutdown",
            NodeDraining => "node_draining",
            InvalidChannel => "invalid_channel",
            TooManyChannels => "too_many_channels",
            PublishForbidden => "publish_forbidden",
            Internal => "internal",
        }
    }

    /// The WebSocket close code used when this error ends a connection.
    pub const fn close_code(self) -> u16 {
        use ErrorCode::*;
        match self {
            FrameTooLarge => 1009,
            InvalidUtf8 => 1007,
            ProtocolError | ConnectRequired | ConnectTimeout => 1002,
            UnknownApp | TokenMissing | TokenMalformed | TokenAlgorithm | TokenSignature | TokenExpired
            | TokenNotYetValid | TokenClaims | AuthRejected => 4001,
            TooManyConnections | TooManyDevices | AuthUnavailable => 1013,
            SlowConsumer => 4008,
            IdleTimeout => 4010,
            ServerShutdown | NodeDraining => 1001,
            Internal => 1011,
            InvalidJson | InvalidFrame | UnknownType | BinaryUnsupported | InvalidRecipient | RateLimited
            | AlreadyConnected | Denied | FilterFailed | InvalidChannel | TooManyChannels | PublishForbidden => 1008,
        }
    }

    /// Whether the error rejects the connection at authentication.
    pub const fn is_auth(self) -> bool {
        self.close_code() == 4001
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
