//! Why an end closes a link, said once for both ends: each reason carries
//! its `Goaway` code and its text, so a code and its reason cannot disagree,
//! and the gateway's and the service's goodbyes are built the same way
//! (docs/link-protocol.md, "Goaway").

use std::fmt;

use crate::proto::{Frame, GOAWAY_NORMAL, GOAWAY_PROTOCOL_ERROR, GOAWAY_UNSUPPORTED_VERSION};

/// The end that says goodbye.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// A gateway (the dialling end).
    Gateway,
    /// A service (the listening end).
    Service,
}

impl End {
    fn name(self) -> &'static str {
        match self {
            End::Gateway => "gateway",
            End::Service => "service",
        }
    }
}

/// Why an end sends `Goaway`: the one place its code and reason are chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Goaway {
    /// The end shuts down (code 0, "gateway shutting down").
    ShuttingDown(End),
    /// The service's application stopped taking events (code 0).
    ServiceStopped,
    /// The peer speaks another protocol version (code 1); the text names
    /// both.
    UnsupportedVersion(String),
    /// The peer broke the protocol (code 2): a malformed or oversized
    /// frame, or a frame not allowed in that direction or state.
    ProtocolError(String),
}

impl Goaway {
    /// The `GOAWAY_*` code on the wire.
    pub fn code(&self) -> u16 {
        match self {
            Goaway::ShuttingDown(_) | Goaway::ServiceStopped => GOAWAY_NORMAL,
            Goaway::UnsupportedVersion(_) => GOAWAY_UNSUPPORTED_VERSION,
            Goaway::ProtocolError(_) => GOAWAY_PROTOCOL_ERROR,
        }
    }

    /// The frame that says it.
    pub fn frame(&self) -> Frame {
        Frame::Goaway {
            code: self.code(),
            reason: self.to_string(),
        }
    }
}

/// The reason text, as sent and logged.
impl fmt::Display for Goaway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Goaway::ShuttingDown(end) => write!(f, "{} shutting down", end.name()),
            Goaway::ServiceStopped => f.write_str("service stopped"),
            Goaway::UnsupportedVersion(reason) | Goaway::ProtocolError(reason) => {
                f.write_str(reason)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_goaway_says_its_code_and_reason() {
        let cases = [
            (
                Goaway::ShuttingDown(End::Gateway),
                0,
                "gateway shutting down",
            ),
            (
                Goaway::ShuttingDown(End::Service),
                0,
                "service shutting down",
            ),
            (Goaway::ServiceStopped, 0, "service stopped"),
            (Goaway::UnsupportedVersion("v9".into()), 1, "v9"),
            (Goaway::ProtocolError("bad frame".into()), 2, "bad frame"),
        ];
        for (goaway, code, reason) in cases {
            assert_eq!(
                goaway.frame(),
                Frame::Goaway {
                    code,
                    reason: reason.into()
                }
            );
        }
    }
}
