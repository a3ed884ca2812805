//! Exit statuses of the contract, and the error markers that select them.
//!
//! Code anywhere returns `anyhow::Error`; wrapping the root cause in one of these markers picks
//! the exit status. Anything else is a failure (1).

use std::fmt;

pub const SUCCESS: i32 = 0;
pub const FAILURE: i32 = 1;
pub const USAGE: i32 = 2;
pub const REFUSED: i32 = 3;
pub const SUPERSEDED: i32 = 75;

/// Bad command line or configuration: exit 2, nothing was changed.
#[derive(Debug)]
pub struct Usage(pub String);

/// Refused for safety (stale data, split-brain, peer still primary): exit 3.
#[derive(Debug)]
pub struct Refused(pub String);

/// A newer event arrived while this one waited: exit 75, nothing done.
#[derive(Debug)]
pub struct Superseded(pub String);

macro_rules! marker {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::error::Error for $t {}
    };
}
marker!(Usage);
marker!(Refused);
marker!(Superseded);

/// The exit status for an error: the first marker found in its chain.
pub fn code_for(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.is::<Usage>() {
            return USAGE;
        }
        if cause.is::<Refused>() {
            return REFUSED;
        }
        if cause.is::<Superseded>() {
            return SUPERSEDED;
        }
    }
    FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn markers_survive_context() {
        let e: anyhow::Error = Refused("stale".into()).into();
        let e = e.context("promote hast0");
        assert_eq!(code_for(&e), REFUSED);
        let e = Err::<(), _>(Usage("bad".into())).context("x").unwrap_err();
        assert_eq!(code_for(&e), USAGE);
        assert_eq!(code_for(&anyhow::anyhow!("boom")), FAILURE);
        assert_eq!(code_for(&Superseded("newer".into()).into()), SUPERSEDED);
    }
}
