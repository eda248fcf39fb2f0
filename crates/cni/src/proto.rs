//! The CNI protocol as a plugin sees it (spec 0.3.0 to 1.1.0): the environment, the
//! configuration on stdin, results converted between versions, and errors. Pure: the
//! plugin does the I/O.

pub mod conf;
pub mod env;
pub mod error;
pub mod result;
pub mod version;

pub use conf::NetConf;
pub use env::{Command, Env};
pub use error::{CniError, code};
