//! The machine: external commands, fsck, mount, unmount and the processes holding it, services.
