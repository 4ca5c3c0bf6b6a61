//! KoproGo appliance library: everything `koprogo` does, one module per part of the
//! process tree (see ../shared/DESIGN.md). `main.rs` only calls [`cli::main`].

pub mod admin;
pub mod backend;
pub mod backup;
pub mod capacity;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod fsutil;
pub mod logs;
pub mod metrics;
pub mod postgres;
pub mod process;
pub mod procfs;
pub mod proxy;
pub mod secrets;
pub mod supervisor;
pub mod tls;
pub mod update;
