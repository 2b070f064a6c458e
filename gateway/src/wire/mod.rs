//! Byte-level codecs that hold no gateway state: the lowest layer, importing
//! nothing else from the crate.
//!
//! - [`lean_tls`]: a TLS server stream that holds no buffer while its client
//!   is idle.
//! - [`ws`]: the server side of WebSocket framing: a decoder that holds no
//!   buffer while its client is idle, frames encoded once into shared bytes.
//! - [`ws_stream`]: a client's WebSocket on that codec, for listeners with
//!   `ws_codec = "edgegate"`.

pub mod lean_tls;
pub mod ws;
pub mod ws_stream;
