//! Nameservers, for DNS redirection that is limited to the configured servers.

use std::net::IpAddr;

/// The `nameserver` entries of a resolv.conf; unparsable entries are skipped (the C
/// resolver ignores them too). A zone suffix (`fe80::1%eth0`) is dropped.
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next()).flatten()
        })
        .filter_map(|addr| addr.split('%').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_nameservers() {
        let text = "# generated\nsearch svc.cluster.local\nnameserver 10.96.0.10\nnameserver  fd00::a\n\
                    nameserver fe80::1%eth0\nnameserver bogus\noptions ndots:5\n";
        let got: Vec<String> = super::nameservers(text).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["10.96.0.10", "fd00::a", "fe80::1"]);
    }
}
