//! Byte-level codecs that hold no gateway state: the lowest layer, importing
//! nothing else from the crate.
//!
//! - [`lean_tls`]: a TLS server stream that holds no buffer while its client
//!   is idle.

pub mod lean_tls;
