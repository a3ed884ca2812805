//! The replication daemon (backend `tandem`).
pub mod nbd;
