//! The message protocol between domains: one module per interface, postcard wire format.
//!
//! Placeholder. The request/reply enums, `DomainId { index, generation }` and the golden
//! wire-format vectors arrive with the domains/IPC slice (see `docs/architecture.md`). Rule
//! kept from the start: this crate depends on no other crate of the workspace.
#![no_std]
#![forbid(unsafe_code)]
