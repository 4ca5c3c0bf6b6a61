//! KoproGo appliance library: everything `koprogo` does, one module per part of the
//! process tree (see ../shared/DESIGN.md and README's "Architecture"). `main.rs`
//! only calls [`cli::main`].
//!
//! # Layers
//! A module imports only from layers below its own (and from modules beside it
//! that are listed before it on its line); nothing imports upward:
//!
//! 1. Foundations: [`fsutil`] (link-safe file access, atomic writes), [`procfs`]
//!    (what /proc says), [`sync`] (the poisoned-lock policy), [`config`] (the file as written, resolved, validated;
//!    units). They import nothing else of the crate (config nothing at all).
//! 2. Building blocks: [`process`] (reaper, service loop, privileges, launcher),
//!    [`logs`] (capture and rotation), [`secrets`].
//! 3. Parts: [`postgres`], [`tls`]; then [`admin`] and [`proxy`]; then [`backend`]
//!    (the API service); then [`backup`]; then [`update`] and [`capacity`].
//! 4. Surfaces: [`control`] (the socket's protocol, server and client), [`check`];
//!    then [`metrics`].
//! 5. The top: [`supervisor`] (boot, the [`supervisor::Site`] handle, `supervise`,
//!    systemd notifications), then [`cli`].
//!
//! Data flows one way: services publish their state on watch channels; the proxy,
//! the notifier, status and metrics only read it; commands go down to a service
//! as messages on its command channel.

pub mod config;
pub mod fsutil;
pub mod procfs;
pub mod sync;

pub mod logs;
pub mod process;
pub mod secrets;

pub mod admin;
pub mod backend;
pub mod backup;
pub mod capacity;
pub mod postgres;
pub mod proxy;
pub mod tls;
pub mod update;

pub mod check;
pub mod control;
pub mod metrics;

pub mod cli;
pub mod supervisor;
