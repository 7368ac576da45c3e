//! The message protocol between domains: one module per interface, postcard wire format.
//!
//! Design rules:
//! - This crate depends on no crate of the workspace; every domain and the core may depend on
//!   it. Domains meet only through the types defined here.
//! - One module per interface ([`scheduler`], [`memory`], [`timer`], [`hypercall`],
//!   [`recovery`], [`lifecycle`]), each with a `Request` enum, a `Reply` enum and a small `Copy`
//!   error enum; what several interfaces share lives beside them ([`limits`], [`quota`]).
//!   **Declaration order is the wire format**: variants and fields are never reordered, only
//!   appended. Golden byte vectors in each module's tests pin the encoding, so an accidental
//!   reorder fails `cargo test`.
//! - Every message is bounded: heapless containers only, no allocation, and every value of
//!   every message type encodes into [`MESSAGE_MAX`] bytes (each module tests its largest
//!   message).
//! - Every operation declares its [`Idempotence`]; [`call_with_retry`] retries idempotent
//!   operations transparently after [`CallError::PeerRestarted`] and surfaces everything else.
//! - Decoding never panics: malformed, truncated, oversized or trailing input and unknown
//!   operations come back as a typed [`WireError`]; a callee's receive loop ([`serve`]) answers
//!   them with a [`CallError`] in its [`Response`] instead of running the request.
//! - On the wire a request is the postcard encoding of the interface's `Request`; a reply is
//!   the encoding of [`Response`]`<Reply>` (`Result<Reply, CallError>`), so a callee can refuse
//!   bytes it cannot decode. The typed client [`call`] hides both.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

mod call;
mod domain;
pub mod hypercall;
pub mod lifecycle;
pub mod limits;
pub mod memory;
pub mod quota;
pub mod recovery;
pub mod scheduler;
pub mod timer;
mod wire;

pub use call::{
    CallError, Idempotence, Operation, Response, Transport, call, call_with_retry, serve,
};
pub use domain::{DomainId, DomainIndex};
pub use wire::{MESSAGE_MAX, WireError, decode, decode_request, encode};

#[cfg(test)]
pub(crate) mod test_support;
