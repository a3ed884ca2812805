//! The replication daemon (backend `tandem`).
