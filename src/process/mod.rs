//! The building blocks every supervised service uses, below the supervisor that
//! composes them: the one [`reaper`] (spawns children, collects every exit, reaps
//! orphans), the [`service`] loop (start, readiness gate, health, back-off, stop) with
//! its observable [`state`] and [`backoff`], the [`privileges`] of the process
//! (service user, directories, the state lock), the [`oom`] policy and the [`launcher`] that starts the
//! API server as its own user. Nothing here knows which services exist.

pub mod backoff;
pub mod event;
pub mod launcher;
pub mod oom;
pub mod privileges;
pub mod reaper;
pub mod service;
pub mod spec;
pub mod state;
pub mod stop;
