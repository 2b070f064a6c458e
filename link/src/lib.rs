//! EdgeGate link protocol: the wire codec, the service-side runner and the
//! example service.
//!
//! A **link** is one persistent TCP connection from an EdgeGate gateway to a
//! **service**. Gateways dial; services listen. Over a link the gateway
//! forwards its **clients** (WebSocket peers) to the service, and the service
//! answers them, closes them and groups them into **topics** it can publish
//! to in one frame. `docs/link-protocol.md` is the language-neutral spec.
//!
//! # Layout
//!
//! | module | holds |
//! |---|---|
//! | [`proto`] | [`Frame`](proto::Frame) and [`FrameCodec`](proto::FrameCodec): the wire format, shared by gateway and service |
//! | [`backoff`] | [`Backoff`](backoff::Backoff): jittered exponential backoff, the one retry policy of link redials and both ends' accept loops |
//! | [`goaway`] | [`Goaway`](goaway::Goaway): why an end closes a link, its code and reason chosen in one place for both ends |
//! | [`hello`] | the `Hello` exchange, the same checks on both ends: [`offer`](hello::offer) (gateway), [`answer`](hello::answer) (service) |
//! | [`writer`] | [`LinkWriter`](writer::LinkWriter): the writing half of a link end, used by both ends: every write bounded, its own pings, pongs ahead of data |
//! | [`service`] | [`Service`](service::Service): accepts links, runs the hello and ping exchange, turns frames into [`Event`](service::Event)s |
//! | [`example`] | the example service (`/echo`, `/chat`) that `edgegate demo` and the tests run |
//!
//! # Glossary
//!
//! - **client**: a remote peer connected to a gateway, known on a link by its
//!   [`ClientId`](proto::ClientId).
//! - **service**: a backend; it listens for links.
//! - **link**: one connection from a gateway to a service; a gateway keeps a
//!   pool of them per service.
//! - **route**: the listener path a client came in on; it tells the service
//!   what the client wants.
//! - **topic**: a named group of clients, held by the gateway, that the
//!   service publishes to once per gateway.
//!
//! # A client's life, seen from a service
//!
//! 1. `ClientOpen` arrives on one link; the client stays on that link, so its
//!    messages stay in order. Key it by `(link, client)`.
//! 2. `ClientMessage`s flow both ways; `Subscribe`/`Publish` fan out.
//! 3. `ClientClose` from either side ends it; a dropped link ends every
//!    client on it.

// Stricter than the workspace policy: this crate is the protocol other
// services build on, so it has no unsafe at all and documents every item.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod example;
pub mod goaway;
pub mod hello;
pub mod proto;
pub mod service;
pub mod writer;
