//! One iptables rule as data, rendered exactly the way `iptables-save` prints it back,
//! so that generated rules and saved rules compare as plain text.

use std::fmt::{self, Write};

use ipnet::IpNet;

use kuma::{Protocol, Range16};

/// The prefix of every rule comment: it is how our rules are recognised later.
pub const COMMENT_PREFIX: &str = "kuma/mesh/transparent/proxy/";

/// The prefix of our chain names.
pub const CHAIN_PREFIX: &str = "KUMA_MESH_";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `-m tcp|udp [--sport P] [--dport P]`, `!` on the destination port when `not_dport`.
    Port { protocol: Protocol, sport: Option<u16>, dport: Option<u16>, not_dport: bool },
    /// `-m multiport --dports a,b:c` (at most 15 slots, a range taking two).
    Multiport(Vec<Range16>),
    /// `-m owner [!] --uid-owner a[-b]`.
    Owner { uids: Uids, negated: bool },
    /// `-m conntrack --ctstate INVALID`.
    CtStateInvalid,
    /// `-m comment --comment "kuma/mesh/transparent/proxy/<text>"`.
    Comment(String),
}

/// An inclusive range of UIDs (full 32 bits: the sidecar UID is not limited to 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uids {
    pub first: u32,
    pub last: u32,
}

impl Uids {
    pub fn one(uid: u32) -> Self {
        Uids { first: uid, last: uid }
    }
}

impl From<Range16> for Uids {
    fn from(r: Range16) -> Self {
        Uids { first: r.first.into(), last: r.last.into() }
    }
}

impl fmt::Display for Uids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last { write!(f, "{}", self.first) } else { write!(f, "{}-{}", self.first, self.last) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Return,
    Drop,
    Chain(String),
    Redirect(u16),
    CtZone(u16),
    Log { prefix: String, level: u8 },
}

/// The address part of a rule (`[!] -s`, `[!] -d`, `-i`, `-o`, `-p`) followed by
/// matches and the target: the order `iptables-save` uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spec {
    pub source: Option<IpNet>,
    pub destination: Option<(IpNet, bool)>,
    pub in_interface: Option<String>,
    pub out_interface: Option<String>,
    pub protocol: Option<Protocol>,
    pub matches: Vec<Match>,
    pub target: Option<Target>,
}

impl Spec {
    pub fn new() -> Self {
        Spec::default()
    }
    pub fn source(mut self, net: IpNet) -> Self {
        self.source = Some(net);
        self
    }
    pub fn destination(mut self, net: IpNet) -> Self {
        self.destination = Some((net, false));
        self
    }
    pub fn not_destination(mut self, net: IpNet) -> Self {
        self.destination = Some((net, true));
        self
    }
    pub fn in_interface(mut self, name: &str) -> Self {
        self.in_interface = Some(name.to_owned());
        self
    }
    pub fn out_interface(mut self, name: &str) -> Self {
        self.out_interface = Some(name.to_owned());
        self
    }
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = Some(protocol);
        self
    }
    /// `-p tcp|udp -m tcp|udp --dport P`.
    pub fn dport(self, protocol: Protocol, port: u16) -> Self {
        self.protocol(protocol).matching(Match::Port { protocol, sport: None, dport: Some(port), not_dport: false })
    }
    /// `-p tcp|udp -m tcp|udp --sport P`.
    pub fn sport(self, protocol: Protocol, port: u16) -> Self {
        self.protocol(protocol).matching(Match::Port { protocol, sport: Some(port), dport: None, not_dport: false })
    }
    pub fn uid(self, uids: impl Into<Uids>) -> Self {
        self.matching(Match::Owner { uids: uids.into(), negated: false })
    }
    pub fn not_uid(self, uids: impl Into<Uids>) -> Self {
        self.matching(Match::Owner { uids: uids.into(), negated: true })
    }
    pub fn matching(mut self, m: Match) -> Self {
        self.matches.push(m);
        self
    }
    pub fn jump(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }
}

/// A rule in a chain. `insert_at` renders `-I CHAIN n` instead of `-A CHAIN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub insert_at: Option<u32>,
    pub spec: Spec,
}

impl Rule {
    /// The rule as `iptables-save` prints it: `-A CHAIN <spec>`.
    pub fn saved_form(&self) -> String {
        format!("-A {} {}", self.chain, self.spec)
    }

    /// The rule as an `iptables-restore` line.
    pub fn restore_line(&self) -> String {
        match self.insert_at {
            Some(n) => format!("-I {} {n} {}", self.chain, self.spec),
            None => self.saved_form(),
        }
    }
}

/// `a` or `a<sep>b`: multiport writes ranges with `:`, messages with `-`.
pub fn format_range(r: Range16, sep: char) -> String {
    if r.first == r.last { r.first.to_string() } else { format!("{}{sep}{}", r.first, r.last) }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        if let Some(net) = self.source {
            write!(out, " -s {net}")?;
        }
        if let Some((net, negated)) = self.destination {
            write!(out, " {}-d {net}", if negated { "! " } else { "" })?;
        }
        if let Some(name) = &self.in_interface {
            write!(out, " -i {name}")?;
        }
        if let Some(name) = &self.out_interface {
            write!(out, " -o {name}")?;
        }
        if let Some(p) = self.protocol {
            write!(out, " -p {}", p.as_str())?;
        }
        for m in &self.matches {
            match m {
                Match::Port { protocol, sport, dport, not_dport } => {
                    write!(out, " -m {}", protocol.as_str())?;
                    if let Some(p) = sport {
                        write!(out, " --sport {p}")?;
                    }
                    if let Some(p) = dport {
                        write!(out, " {}--dport {p}", if *not_dport { "! " } else { "" })?;
                    }
                }
                Match::Multiport(ports) => {
                    let list: Vec<String> = ports.iter().map(|r| format_range(*r, ':')).collect();
                    write!(out, " -m multiport --dports {}", list.join(","))?;
                }
                Match::Owner { uids, negated } => {
                    write!(out, " -m owner {}--uid-owner {uids}", if *negated { "! " } else { "" })?;
                }
                Match::CtStateInvalid => out.push_str(" -m conntrack --ctstate INVALID"),
                Match::Comment(text) => write!(out, " -m comment --comment \"{COMMENT_PREFIX}{text}\"")?,
            }
        }
        match &self.target {
            None => {}
            Some(Target::Return) => out.push_str(" -j RETURN"),
            Some(Target::Drop) => out.push_str(" -j DROP"),
            Some(Target::Chain(name)) => write!(out, " -j {name}")?,
            Some(Target::Redirect(port)) => write!(out, " -j REDIRECT --to-ports {port}")?,
            Some(Target::CtZone(zone)) => write!(out, " -j CT --zone {zone}")?,
            Some(Target::Log { prefix, level }) => {
                write!(out, " -j LOG --log-prefix \"{prefix}\"")?;
                // iptables-save leaves out the default level (4, warning).
                if *level != 4 {
                    write!(out, " --log-level {level}")?;
                }
            }
        }
        f.write_str(out.trim_start())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_in_save_order() {
        let spec = Spec::new()
            .protocol(Protocol::Tcp)
            .out_interface("lo")
            .not_destination("127.0.0.1/32".parse().unwrap())
            .uid(Uids::one(5678))
            .jump(Target::Chain("KUMA_MESH_INBOUND_REDIRECT".into()));
        assert_eq!(
            spec.to_string(),
            "! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 5678 -j KUMA_MESH_INBOUND_REDIRECT"
        );
        let spec = Spec::new()
            .protocol(Protocol::Udp)
            .matching(Match::Multiport(vec![Range16::single(53), Range16 { first: 80, last: 90 }]))
            .not_uid(Range16 { first: 1, last: 2 })
            .matching(Match::Comment("x".into()))
            .jump(Target::Log { prefix: "P: ".into(), level: 4 });
        assert_eq!(
            spec.to_string(),
            "-p udp -m multiport --dports 53,80:90 -m owner ! --uid-owner 1-2 \
             -m comment --comment \"kuma/mesh/transparent/proxy/x\" -j LOG --log-prefix \"P: \""
        );
    }
}
