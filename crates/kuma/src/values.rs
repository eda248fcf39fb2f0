//! Parsers for the scalar value syntaxes shared by the YAML and the legacy annotations.
//! Each returns the reason as a plain string; the caller wraps it into a `ConfigError`
//! that names the annotation and the field.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::model::{Protocol, Range16, UidPortExclusion};

/// Upper bound on the entries of any list: every entry becomes at least one rule per
/// family, and a pod annotation must not be able to make the plugin build a huge rule set.
pub const MAX_LIST_ENTRIES: usize = 1024;

pub fn port(text: &str) -> Result<u16, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("a port number is required".into());
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("a port must be a whole number in 1..=65535".into());
    }
    match text.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err("a port must be in 1..=65535".into()),
    }
}

/// A comma-separated port list; the empty string is the empty list.
pub fn port_list(text: &str) -> Result<Vec<u16>, String> {
    comma_entries(text)?.into_iter().map(port).collect()
}

/// Splits a comma list, rejecting empty entries and lists over `MAX_LIST_ENTRIES`.
pub fn comma_entries(text: &str) -> Result<Vec<&str>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let entries: Vec<&str> = text.split(',').map(str::trim).collect();
    check_list_len(entries.len())?;
    if entries.iter().any(|e| e.is_empty()) {
        return Err("the list has an empty entry".into());
    }
    Ok(entries)
}

pub fn check_list_len(len: usize) -> Result<(), String> {
    if len > MAX_LIST_ENTRIES {
        return Err(format!("the list has {len} entries, at most {MAX_LIST_ENTRIES} are allowed"));
    }
    Ok(())
}

/// Booleans as Kuma's annotations write them: `true`/`false` and `enabled`/`disabled`,
/// in any letter case (Kuma lowercases them before comparing).
pub fn boolean(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "enabled" => Ok(true),
        "false" | "disabled" => Ok(false),
        _ => Err("expected true, false, enabled or disabled (in any letter case)".into()),
    }
}

/// A comma-separated list of 16-bit numbers, each trimmed, the empty string being the
/// empty list: the syntax Kuma checks `kuma.io/envoy-admin-port` against (0 included).
pub fn kuma_port_list(text: &str) -> Result<Vec<u16>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let entries: Vec<&str> = text.split(',').map(str::trim).collect();
    check_list_len(entries.len())?;
    entries
        .into_iter()
        .map(|e| match e.parse::<u16>() {
            Ok(port) if e.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
            _ => Err(format!("{e:?} is not a port number (0..=65535)")),
        })
        .collect()
}

/// The user database Kuma resolves sidecar user names in: the node's own file.
pub const PASSWD: &str = "/etc/passwd";
/// Larger files are refused rather than read: real ones are a few kilobytes.
const MAX_PASSWD_BYTES: u64 = 4 << 20;

/// The sidecar's UID: a number as given, or a user name resolved in the node's
/// `/etc/passwd`, read directly as a file. Never through NSS: its LDAP or SSSD modules
/// can stall the plugin, and the pod's owner match only needs the number.
pub fn uid(text: &str) -> Result<u32, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("expected a UID or a user name".into());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<u32>().map_err(|_| "the UID does not fit in 32 bits".to_string());
    }
    let passwd = read_passwd(std::path::Path::new(PASSWD))?;
    uid_in_passwd(&passwd, text).ok_or_else(|| format!("user {text:?} is not in {PASSWD} (give a numeric UID instead)"))
}

fn read_passwd(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| format!("cannot read {} to resolve the user name: {e}", path.display());
    let file = std::fs::File::open(path).map_err(cannot)?;
    if !file.metadata().map_err(cannot)?.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PASSWD_BYTES + 1).read_to_end(&mut bytes).map_err(cannot)?;
    if bytes.len() as u64 > MAX_PASSWD_BYTES {
        return Err(format!("{} is larger than {MAX_PASSWD_BYTES} bytes", path.display()));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The UID of `name` in passwd(5) text (`name:password:uid:...`); the first entry wins,
/// as in the C library; comments, NIS `+`/`-` lines and malformed lines are skipped.
pub fn uid_in_passwd(passwd: &str, name: &str) -> Option<u32> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name || line.starts_with(['#', '+', '-']) {
            return None;
        }
        fields.nth(1)?.parse().ok()
    })
}

/// An IP address (taken as a single-host network) or a CIDR. Host bits are cleared,
/// as iptables does, so rules compare equal to what iptables reports back.
pub fn ip_or_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err("expected an IP address or a CIDR such as 10.0.0.1, 10.0.0.0/8 or fd00::/8".into())
}

pub fn ip_list(text: &str) -> Result<Vec<IpNet>, String> {
    comma_entries(text)?.into_iter().map(ip_or_cidr).collect()
}

/// `a-b` or a single value, every value within 16 bits; `min` is the smallest allowed.
fn range16(text: &str, what: &str, min: u32) -> Result<Range16, String> {
    let one = |t: &str| -> Result<u16, String> {
        let t = t.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{what} {t:?} is not a number"));
        }
        match t.parse::<u32>() {
            Ok(v) if (min..=65535).contains(&v) => Ok(v as u16),
            _ => Err(format!("{what} {t} is outside {min}..=65535")),
        }
    };
    let range = match text.split_once('-') {
        Some((a, b)) => Range16 { first: one(a)?, last: one(b)? },
        None => Range16::single(one(text)?),
    };
    if range.first > range.last {
        return Err(format!("{what} range {text:?} runs backwards"));
    }
    Ok(range)
}

fn protocols(text: &str) -> Option<Vec<Protocol>> {
    match text.trim() {
        "" | "*" | "tcp,udp" | "udp,tcp" => Some(vec![Protocol::Tcp, Protocol::Udp]),
        "tcp" => Some(vec![Protocol::Tcp]),
        "udp" => Some(vec![Protocol::Udp]),
        _ => None,
    }
}

fn port_ranges(text: &str) -> Result<Vec<Range16>, String> {
    let text = text.trim();
    if text.is_empty() || text == "*" {
        return Ok(Vec::new());
    }
    comma_entries(text)?.into_iter().map(|p| range16(p, "port", 1)).collect()
}

/// One `[protocol:][ports:]uids` entry. With two parts the first is a protocol when it
/// spells one, otherwise ports; `*` and the empty string mean "all" in either place.
pub fn uid_port_exclusion(text: &str) -> Result<UidPortExclusion, String> {
    let parts: Vec<&str> = text.trim().split(':').collect();
    let (proto, ports, uids) = match parts.as_slice() {
        [uids] => ("", "", *uids),
        [first, uids] if protocols(first).is_some() && !first.trim().is_empty() && first.trim() != "*" => {
            (*first, "", *uids)
        }
        [ports, uids] => ("", *ports, *uids),
        [proto, ports, uids] => (*proto, *ports, *uids),
        _ => return Err("expected [protocol:][ports:]uids".into()),
    };
    let protocols =
        protocols(proto).ok_or_else(|| format!("protocol {:?} is not one of tcp, udp, tcp,udp, *", proto.trim()))?;
    let uids = uids.trim();
    if uids == "*" || uids.contains(',') {
        return Err("uids must be one UID or an a-b range".into());
    }
    Ok(UidPortExclusion { protocols, ports: port_ranges(ports)?, uids: range16(uids, "uid", 0)? })
}

/// `;`-separated exclusion entries (blank entries, such as after a trailing `;`, are skipped).
pub fn uid_port_exclusions<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Vec<UidPortExclusion>, String> {
    let entries: Vec<&str> = entries.into_iter().filter(|e| !e.trim().is_empty()).collect();
    check_list_len(entries.len())?;
    entries
        .into_iter()
        .map(|e| uid_port_exclusion(e).map_err(|reason| format!("entry {:?}: {reason}", e.trim())))
        .collect()
}

/// Go-style durations (`2s`, `500ms`, `1m30s`); a bare number is seconds.
pub fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || "expected a duration such as 2s, 500ms or 1m".to_string();
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => Duration::from_nanos(1),
            "us" | "µs" => Duration::from_micros(1),
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        let part = unit.checked_mul(u32::try_from(value).map_err(|_| bad())?).ok_or_else(bad)?;
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(port(" 80 "), Ok(80));
        assert_eq!(port("65535"), Ok(65535));
        for bad in ["0", "65536", "-1", "eighty", "", "8 0", "+80", "1e3"] {
            assert!(port(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(port_list(""), Ok(vec![]));
        assert_eq!(port_list("80, 443"), Ok(vec![80, 443]));
        assert!(port_list("80,,443").is_err());
        let many = (1..=10_000).map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        assert!(port_list(&many).unwrap_err().contains("10000 entries"));
    }

    #[test]
    fn booleans() {
        for (text, want) in
            [("enabled", true), ("Enabled", true), ("TRUE", true), ("false", false), ("Disabled", false)]
        {
            assert_eq!(boolean(text), Ok(want), "{text}");
        }
        for bad in ["yes", "1", "0", "on", ""] {
            assert!(boolean(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn kuma_port_lists() {
        assert_eq!(kuma_port_list(""), Ok(vec![]));
        assert_eq!(kuma_port_list("9901, 0"), Ok(vec![9901, 0]));
        for bad in ["65536", "x", "9901,", "-1", "+1"] {
            assert!(kuma_port_list(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn uids() {
        assert_eq!(uid("5678"), Ok(5678));
        assert_eq!(uid("4294967295"), Ok(u32::MAX));
        assert!(uid("4294967296").is_err());
        assert!(uid("").is_err());
        let err = uid("kmc-no-such-user").unwrap_err();
        assert!(err.contains("kmc-no-such-user") && err.contains(PASSWD), "{err}");
    }

    #[test]
    fn user_names_from_passwd_text() {
        let passwd = "# local users\nroot:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n\
                      +nis::::::\nbroken\nkuma-dp:x:5678:5678::/:/bin/false\nnobody:x:1:1::/:/bin/false\n";
        assert_eq!(uid_in_passwd(passwd, "root"), Some(0));
        assert_eq!(uid_in_passwd(passwd, "nobody"), Some(65534), "the first entry wins");
        assert_eq!(uid_in_passwd(passwd, "kuma-dp"), Some(5678));
        for absent in ["nis", "+nis", "broken", "#", "kuma"] {
            assert_eq!(uid_in_passwd(passwd, absent), None, "{absent}");
        }
    }

    #[test]
    fn passwd_reads_are_bounded() {
        let dir = std::env::temp_dir().join(format!("kmc-passwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("passwd");
        std::fs::write(&big, vec![b'#'; (MAX_PASSWD_BYTES + 1) as usize]).unwrap();
        let err = read_passwd(&big).unwrap_err();
        assert!(err.contains("larger than"), "{err}");
        assert!(read_passwd(&dir).unwrap_err().contains("not a regular file"));
        assert!(read_passwd(&dir.join("none")).unwrap_err().contains("cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ips() {
        assert_eq!(ip_or_cidr("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert_eq!(ip_or_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(ip_or_cidr("fd00::1").unwrap().to_string(), "fd00::1/128");
        assert!(ip_or_cidr("10.0.0.0/33").is_err());
        assert!(ip_or_cidr("host.example").is_err());
    }

    #[test]
    fn exclusions() {
        let e = uid_port_exclusion("tcp:22,80-90:1000-1010").unwrap();
        assert_eq!(e.protocols, vec![Protocol::Tcp]);
        assert_eq!(e.ports, vec![Range16::single(22), Range16 { first: 80, last: 90 }]);
        assert_eq!(e.uids, Range16 { first: 1000, last: 1010 });

        let e = uid_port_exclusion("1000").unwrap();
        assert_eq!(e.protocols, vec![Protocol::Tcp, Protocol::Udp]);
        assert!(e.ports.is_empty());

        let e = uid_port_exclusion("udp:1000").unwrap();
        assert_eq!(e.protocols, vec![Protocol::Udp]);
        assert!(e.ports.is_empty());

        let e = uid_port_exclusion("53:1000").unwrap();
        assert_eq!(e.ports, vec![Range16::single(53)]);

        let e = uid_port_exclusion("*:*:0").unwrap();
        assert_eq!(e.uids, Range16::single(0));

        for bad in
            ["tcp:80:*", "tcp:80:1,2", "sctp:80:1", "tcp:0:1", "tcp:90-80:1", "tcp:80:70000", "a:b:c:d", "tcp:80:"]
        {
            assert!(uid_port_exclusion(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(uid_port_exclusions("1000;;udp:53:1001;".split(';')).unwrap().len(), 2);
    }

    #[test]
    fn durations() {
        assert_eq!(duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("3"), Ok(Duration::from_secs(3)));
        for bad in ["", "s", "2x", "-1s", "1.5s"] {
            assert!(duration(bad).is_err(), "{bad} should be refused");
        }
    }
}
