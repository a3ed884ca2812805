//! The replication daemon (backend `tandem`).
pub mod activemap;
pub mod metadata;
