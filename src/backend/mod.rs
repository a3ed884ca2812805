//! Replication backends behind one trait: tandem, hast, drbd, none.
