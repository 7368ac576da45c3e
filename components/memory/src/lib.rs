//! Memory domain: the frame table (owner, type, reference count, validated bit), guest RAM,
//! EPT requests and grants.
//!
//! Placeholder. The memory service becomes an isolated ring-3 domain in the domains/IPC slice
//! of the project (see `docs/architecture.md`); until then this crate holds no logic.
#![no_std]
#![forbid(unsafe_code)]
