//! pushgate's integration tests: one binary, modules inside, real sockets
//! on 127.0.0.1:0 against gateways started in-process (or as processes
//! where exit codes and signals are the point).

// Tests fail loudly on anything unexpected; unwrap is how they say so.
#![allow(clippy::unwrap_used)]

mod support;

mod activation;
mod crash;
mod delivery;
mod device;
mod ops;
mod process;
mod restart;
mod tls;
