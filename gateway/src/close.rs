//! Why a client session ended, and what that means on the wire: the close
//! code and text the client is sent, the code and text its service is told,
//! the `reason` label of `edgegate_clients_closed_total`.
//!
//! One value carries all of it, so a reason and its code cannot disagree.
//! Every module that ends a client (session, outbox, links, drain, metrics)
//! depends on this one; it depends on nothing.

/// Close code sent when the heartbeat times out (4000 + HTTP 408).
pub const HEARTBEAT_TIMEOUT_CODE: u16 = 4408;

/// Longest close reason a close frame can carry (125 bytes of control
/// payload minus the 2-byte code).
pub const MAX_CLOSE_TEXT: usize = 123;

/// Who or what ended a client session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame with this code (echoed back).
    Client { code: u16 },
    /// The client's connection ended without a close frame (EOF, reset).
    ClientGone,
    /// The service asked to close the client with this code and text.
    Service { code: u16, text: Box<str> },
    /// The gateway is draining (1001).
    Shutdown,
    /// Nothing (not even a pong) arrived within the heartbeat timeout (4408).
    HeartbeatTimeout,
    /// A write did not complete within the write timeout (nothing more is written).
    WriteTimeout,
    /// The outbound queue overflowed under the `close` policy (1008).
    SlowReader,
    /// A message above `max_message_bytes` (1009).
    MessageTooBig,
    /// A protocol violation (1002).
    ProtocolError,
    /// A text message that is not UTF-8 (1007); counted as `protocol_error`.
    InvalidUtf8,
    /// The client's link stayed full past the backpressure timeout (1013).
    LinkBackpressure,
    /// The client's link dropped (1012).
    LinkLost,
    /// More control frames than the budget per heartbeat interval (1008).
    ControlFlood,
    /// The service had no link up when the client arrived (1013).
    NoLink,
}

impl CloseReason {
    /// Every label value, so the series exist from start-up. A test checks
    /// that every reason's label is here.
    pub const LABELS: [&'static str; 13] = [
        "client",
        "client_gone",
        "service",
        "shutdown",
        "heartbeat_timeout",
        "write_timeout",
        "slow_reader",
        "message_too_big",
        "protocol_error",
        "link_backpressure",
        "link_lost",
        "no_link",
        "control_flood",
    ];

    /// A service's close, its text cut to what a close frame carries.
    pub fn service(code: u16, text: &str) -> Self {
        CloseReason::Service {
            code,
            text: close_text(text).into(),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::Client { .. } => "client",
            CloseReason::ClientGone => "client_gone",
            CloseReason::Service { .. } => "service",
            CloseReason::Shutdown => "shutdown",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::SlowReader => "slow_reader",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::ProtocolError | CloseReason::InvalidUtf8 => "protocol_error",
            CloseReason::LinkBackpressure => "link_backpressure",
            CloseReason::LinkLost => "link_lost",
            CloseReason::NoLink => "no_link",
            CloseReason::ControlFlood => "control_flood",
        }
    }

    /// The close frame the gateway sends the client, or `None` when it sends
    /// none: the client already closed (its frame is echoed by the
    /// WebSocket layer), is gone, or cannot be written to.
    pub fn frame(&self) -> Option<(u16, &str)> {
        Some(match self {
            CloseReason::Client { .. } | CloseReason::ClientGone | CloseReason::WriteTimeout => {
                return None
            }
            CloseReason::Service { code, text } => (*code, &**text),
            CloseReason::Shutdown => (1001, "gateway draining"),
            CloseReason::HeartbeatTimeout => (HEARTBEAT_TIMEOUT_CODE, "heartbeat timeout"),
            CloseReason::SlowReader => (1008, "slow reader: outbound queue full"),
            CloseReason::MessageTooBig => (1009, "message too big"),
            CloseReason::ProtocolError => (1002, "protocol error"),
            CloseReason::InvalidUtf8 => (1007, "invalid utf-8"),
            CloseReason::LinkBackpressure => (1013, "service busy"),
            CloseReason::LinkLost => (1012, "service link lost"),
            CloseReason::NoLink => (1013, "service unavailable"),
            CloseReason::ControlFlood => (1008, "too many control frames"),
        })
    }

    /// What the service is told in `ClientClose`: the client's or the
    /// service's own code, else 1006 (abnormal) with the reason's label.
    pub fn for_service(&self) -> (u16, &str) {
        match self {
            CloseReason::Client { code } => (*code, "client closed"),
            CloseReason::Service { code, .. } => (*code, "service closed"),
            other => (1006, other.label()),
        }
    }

    /// Whether the connection gets a lingering close (see `linger`): every
    /// end but a client that is gone or a socket that cannot be written to.
    pub fn lingers(&self) -> bool {
        !matches!(self, CloseReason::ClientGone | CloseReason::WriteTimeout)
    }

    /// Whether the service must be told: not when the link itself is gone.
    pub fn tells_service(&self) -> bool {
        !matches!(self, CloseReason::LinkLost)
    }
}

/// Close codes a server may send (RFC 6455 §7.4): 1000-1003, 1007-1014, 3000-4999.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// `text` cut to what a close frame carries ([`MAX_CLOSE_TEXT`] bytes), on a
/// character boundary.
pub fn close_text(text: &str) -> &str {
    if text.len() <= MAX_CLOSE_TEXT {
        return text;
    }
    let mut cut = MAX_CLOSE_TEXT;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_reason() -> Vec<CloseReason> {
        vec![
            CloseReason::Client { code: 1000 },
            CloseReason::ClientGone,
            CloseReason::service(4000, "bye"),
            CloseReason::Shutdown,
            CloseReason::HeartbeatTimeout,
            CloseReason::WriteTimeout,
            CloseReason::SlowReader,
            CloseReason::MessageTooBig,
            CloseReason::ProtocolError,
            CloseReason::InvalidUtf8,
            CloseReason::LinkBackpressure,
            CloseReason::LinkLost,
            CloseReason::NoLink,
            CloseReason::ControlFlood,
        ]
    }

    #[test]
    fn every_label_is_listed() {
        for r in every_reason() {
            assert!(CloseReason::LABELS.contains(&r.label()), "{r:?}");
        }
    }

    #[test]
    fn frames_carry_the_documented_codes() {
        let codes: Vec<_> = every_reason()
            .iter()
            .map(|r| r.frame().map(|(c, _)| c))
            .collect();
        assert_eq!(
            codes,
            [
                None,
                None,
                Some(4000),
                Some(1001),
                Some(4408),
                None,
                Some(1008),
                Some(1009),
                Some(1002),
                Some(1007),
                Some(1013),
                Some(1012),
                Some(1013),
                Some(1008)
            ]
        );
        for r in every_reason() {
            if let Some((_, text)) = r.frame() {
                assert!(text.len() <= MAX_CLOSE_TEXT, "{r:?}");
            }
        }
    }

    #[test]
    fn service_text_is_cut_on_a_char_boundary() {
        let long = "é".repeat(100); // 200 bytes
        let CloseReason::Service { text, .. } = CloseReason::service(4000, &long) else {
            unreachable!()
        };
        assert!(text.len() <= MAX_CLOSE_TEXT);
        assert!(long.starts_with(&*text));
        assert_eq!(text.len(), 122);
    }

    #[test]
    fn the_service_hears_codes_it_can_use() {
        assert_eq!(
            CloseReason::Client { code: 1000 }.for_service(),
            (1000, "client closed")
        );
        assert_eq!(
            CloseReason::service(4001, "x").for_service(),
            (4001, "service closed")
        );
        assert_eq!(
            CloseReason::HeartbeatTimeout.for_service(),
            (1006, "heartbeat_timeout")
        );
        assert!(!CloseReason::LinkLost.tells_service());
    }
}
