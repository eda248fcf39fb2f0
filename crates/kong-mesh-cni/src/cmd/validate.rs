//! `kong-mesh-cni validate`: the flags of [`validator`] and its exit codes.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use validator::{FamilyChoice, Settings, ValidateError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Family {
    /// IPv4, and IPv6 when the pod has an IPv6 address (as the plugin decides).
    Auto,
    Ipv4,
    Ipv6,
}

#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    /// Where the outbound redirect lands (the sidecar's outbound listener).
    #[arg(long, env = "KMC_VALIDATE_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Where the inbound redirect lands (the sidecar's inbound listener).
    #[arg(long, env = "KMC_VALIDATE_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// The sidecar's UID: running as it selects the sidecar probe.
    #[arg(long, env = "KMC_VALIDATE_SIDECAR_UID", default_value_t = 5678)]
    pub sidecar_uid: u32,
    /// The IPv4 address the outbound probe connects to; nothing must answer there.
    #[arg(long, env = "KMC_VALIDATE_PROBE_IPV4", default_value = "10.255.255.254")]
    pub probe_ipv4: Ipv4Addr,
    /// The IPv6 address the outbound probe connects to.
    #[arg(long, env = "KMC_VALIDATE_PROBE_IPV6", default_value = "fd00:6b6d:6300::fe")]
    pub probe_ipv6: Ipv6Addr,
    /// Give up (exit 97) when no probe succeeded within this time (e.g. 10s, 500ms).
    #[arg(long, env = "KMC_VALIDATE_TIMEOUT", default_value = "10s", value_parser = ops::duration)]
    pub timeout: Duration,
    #[arg(long, env = "KMC_VALIDATE_FAMILY", value_enum, default_value = "auto")]
    pub family: Family,
}

impl ValidateArgs {
    fn settings(self) -> Settings {
        Settings {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            sidecar_uid: self.sidecar_uid,
            probe_ipv4: self.probe_ipv4,
            probe_ipv6: self.probe_ipv6,
            timeout: self.timeout,
            family: match self.family {
                Family::Auto => FamilyChoice::Auto,
                Family::Ipv4 => FamilyChoice::Ipv4,
                Family::Ipv6 => FamilyChoice::Ipv6,
            },
        }
    }
}

/// Prints what was validated, or why not, and exits with the contract's code.
pub fn run(args: ValidateArgs) -> ExitCode {
    match validator::validate(&args.settings()) {
        Ok(done) => {
            for v in done {
                println!(
                    "{}: redirected to {} (original destination {})",
                    v.family, v.listener, v.original_destination
                );
            }
            ExitCode::SUCCESS
        }
        Err(e @ ValidateError::NotRedirected { .. }) => {
            eprintln!("error: {e}");
            ExitCode::from(kuma::pod::VALIDATOR_EXIT_NOT_REDIRECTED as u8)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
