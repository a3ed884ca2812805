//! The machine: external commands, fsck, mount, unmount and the processes holding it,
//! services, ZFS pools. Nothing here knows about plans or backends.

pub mod cmd;
pub mod fs;
pub mod service;
pub mod zfs;

pub use cmd::Cmd;
