//! Recovery manager: detection policy, microreset / microreboot orders, reconciliation and
//! escalation.
//!
//! Placeholder. Recovery arrives with the domains/IPC slice (see `docs/architecture.md`); this
//! crate will drive components only through their recovery interface in `ipc`, never by
//! linking their code.
#![no_std]
#![forbid(unsafe_code)]
