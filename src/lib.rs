//! KoproGo appliance library: everything `koprogo` does, one module per part of the
//! process tree (see ../shared/DESIGN.md). `main.rs` only parses the command line.

pub mod logs;
