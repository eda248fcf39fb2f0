//! `kmc-node`: the test node by hand (for the demo and for cleaning up after a crash).
//!
//!   kmc-node up [KONG_MESH_CNI_BINARY]   bring a node up, print where it is, run until
//!                                        SIGINT/SIGTERM, then take it down
//!   kmc-node down ROOT                   take down the node whose root is ROOT, from its
//!                                        state file (after a killed run)

use std::process::ExitCode;

use testkit::{Node, NodeOptions};

fn usage() -> ExitCode {
    eprintln!("usage: kmc-node up [KONG_MESH_CNI_BINARY] | kmc-node down ROOT");
    ExitCode::from(2)
}

/// Blocks SIGINT and SIGTERM in every thread (call before any is started) and returns
/// the set, for `sigwait`.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: the set is initialised by sigemptyset before use; no other thread exists yet.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["down", root] => match testkit::node::teardown(std::path::Path::new(root)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kmc-node: {e}");
                ExitCode::FAILURE
            }
        },
        ["up", rest @ ..] if rest.len() <= 1 => {
            let set = block_stop_signals();
            let options = NodeOptions { kong_mesh_cni: rest.first().map(Into::into), ..NodeOptions::default() };
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
            let node = match runtime.block_on(Node::up(options)) {
                Ok(node) => node,
                Err(e) => {
                    eprintln!("kmc-node: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!("node {} Ready after {:.1?}", node.name, node.up_time);
            println!("root {}", node.root.display());
            println!("kubeconfig {}", node.kubeconfig.display());
            println!("conflist {}", node.conflist.display());
            println!("(SIGINT or SIGTERM takes it down; after a crash: kmc-node down {})", node.root.display());
            let mut signal = 0;
            // SAFETY: set holds the signals blocked above.
            unsafe { libc::sigwait(&set, &mut signal) };
            match node.down() {
                Ok(_host) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kmc-node: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => usage(),
    }
}
