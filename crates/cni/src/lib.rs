//! The CNI side of kong-mesh-cni: the protocol as a plugin sees it ([`proto`], pure) and
//! the plugin itself ([`plugin`]), which the container runtime runs for every pod, and the
//! lookup protocol it speaks with the node agent ([`agent`], pure).

#![forbid(unsafe_code)]

pub mod agent;
pub mod plugin;
pub mod proto;
