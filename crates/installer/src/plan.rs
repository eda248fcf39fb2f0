//! What to write in the net dir, decided from what is there: which file the runtime
//! uses (discovery), and the edits that chain us into it or take us out. Pure: the
//! caller reads the files into a [`Snapshot`] and applies the [`FileOp`]s.

use std::collections::BTreeMap;

use crate::conflist::{self, Parsed};
use crate::template::Ours;

/// Configuration files of the net dir by name: content, or why it could not be read.
/// Holds every `.conf`/`.conflist` when auto-detecting, else the named file and its
/// `.conflist` sibling.
pub type Snapshot = BTreeMap<String, Result<Vec<u8>, String>>;

/// One change in the net dir, applied atomically and in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    Write { name: String, content: String },
    Remove { name: String },
}

/// Where our plugin stands, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Our entry is in `file` as it should be.
    InPlace { file: String, primary: Vec<String> },
    /// Apply `ops` to put our entry (back) into `file`.
    Apply { file: String, primary: Vec<String>, ops: Vec<FileOp> },
    /// There is nothing to chain into yet (the primary CNI has not written its file).
    Waiting { reason: String },
    /// The file the runtime uses cannot be chained into; it is left untouched.
    Refused { file: String, reason: String },
}

impl Plan {
    pub fn is_in_place(&self) -> bool {
        matches!(self, Plan::InPlace { .. })
    }
}

/// Which files to read for a [`Snapshot`]: the named file and its `.conf`/`.conflist`
/// sibling (a wrapper and its original), or `None`: every configuration file.
pub fn wanted(conf_name: Option<&str>) -> Option<Vec<String>> {
    let name = conf_name?;
    let sibling = match name.strip_suffix("list") {
        Some(conf) if name.ends_with(".conflist") => Some(conf.to_string()),
        _ => name.ends_with(".conf").then(|| format!("{name}list")),
    };
    Some([Some(name.to_string()), sibling].into_iter().flatten().collect())
}

/// The file the runtime will use, parsed.
struct Target<'a> {
    name: &'a str,
    text: &'a str,
    parsed: Parsed,
}

/// `CNI_CONF_NAME` (with `X.conf` falling back to `X.conflist`), or the first valid
/// configuration file in sorted order, skipping our own standalone conf. `Err` is the
/// plan when there is no target.
fn discover<'a>(conf_name: Option<&'a str>, snap: &'a Snapshot, ours: &Ours) -> Result<Target<'a>, Plan> {
    let read = |name: &'a str| -> Result<Target<'a>, String> {
        let bytes = snap[name].as_ref().map_err(|e| format!("cannot be read ({e})"))?;
        let parsed = conflist::classify(name, bytes, ours)?;
        if parsed.only_ours(ours) {
            return Err("it holds only our own plugin".into());
        }
        let text = std::str::from_utf8(bytes).expect("classify accepted UTF-8");
        Ok(Target { name, text, parsed })
    };
    if let Some(name) = conf_name {
        let fallback = format!("{name}list");
        let name = match snap
            .get_key_value(name)
            .or_else(|| snap.get_key_value(fallback.as_str()).filter(|_| name.ends_with(".conf")))
        {
            Some((name, _)) => name.as_str(),
            None => return Err(Plan::Waiting { reason: format!("{name} does not exist yet") }),
        };
        return read(name).map_err(|reason| Plan::Refused { file: name.to_string(), reason });
    }
    let mut skipped = Vec::new();
    for name in snap.keys().filter(|n| conflist::is_conf_name(n)) {
        match read(name) {
            Ok(target) => return Ok(target),
            Err(reason) => skipped.push(format!("{name}: {reason}")),
        }
    }
    let reason = match skipped.is_empty() {
        true => "there is no .conf or .conflist file yet".to_string(),
        false => format!("there is no valid .conf or .conflist file yet (skipped {})", skipped.join("; ")),
    };
    Err(Plan::Waiting { reason })
}

/// Chained mode: what it takes to have our entry in the configuration the runtime uses.
pub fn chain(conf_name: Option<&str>, snap: &Snapshot, ours: &Ours) -> Plan {
    let target = match discover(conf_name, snap, ours) {
        Ok(t) => t,
        Err(plan) => return plan,
    };
    let primary = target.parsed.primary_types(ours);
    match &target.parsed {
        // Runtimes read a .conf as one plugin: the chain has to be a .conflist, which
        // takes the .conf's place (a .conf sorts before its .conflist, so it must go).
        Parsed::Conf { .. } => {
            let list = format!("{}list", target.name);
            if let Some(existing) = snap.get(&list)
                && wrapper_of(&list, existing, ours).as_deref() != Some(target.name)
            {
                let reason = format!("{list} exists and is not ours; chaining {} means writing {list}", target.name);
                return Plan::Refused { file: target.name.to_string(), reason };
            }
            let desired = conflist::entry(ours, Some(target.name));
            let ops = vec![
                FileOp::Write { name: list.clone(), content: conflist::wrap(target.text, ours, &desired) },
                FileOp::Remove { name: target.name.to_string() },
            ];
            Plan::Apply { file: list, primary, ops }
        }
        Parsed::List { wrapped, .. } => {
            let desired = conflist::entry(ours, wrapped.as_deref());
            let file = target.name.to_string();
            if conflist::is_chained(&target.parsed, &desired) {
                return Plan::InPlace { file, primary };
            }
            match conflist::merge(target.text, ours, &desired) {
                Some(content) => {
                    Plan::Apply { ops: vec![FileOp::Write { name: file.clone(), content }], file, primary }
                }
                None => Plan::Refused { file, reason: "its layout could not be edited".into() },
            }
        }
    }
}

/// Chained mode, on removal: the edits that take our entry out of the configuration,
/// turning a wrapper back into the original `.conf`.
pub fn unchain(conf_name: Option<&str>, snap: &Snapshot, ours: &Ours) -> Vec<FileOp> {
    let Ok(target) = discover(conf_name, snap, ours) else {
        return Vec::new();
    };
    match &target.parsed {
        // The primary rewrote its .conf over our wrapper: the wrapper is stale.
        Parsed::Conf { .. } => {
            let list = format!("{}list", target.name);
            match snap.get(&list).and_then(|existing| wrapper_of(&list, existing, ours)) {
                Some(_) => vec![FileOp::Remove { name: list }],
                None => Vec::new(),
            }
        }
        Parsed::List { ours: idx, .. } if idx.is_empty() => Vec::new(),
        Parsed::List { value, wrapped: Some(conf), ours: idx }
            if value["plugins"].as_array().map(Vec::len) == Some(2) && idx == &[1] =>
        {
            let remove = FileOp::Remove { name: target.name.to_string() };
            match (snap.contains_key(conf), conflist::unwrap(target.text)) {
                (false, Some(content)) => vec![FileOp::Write { name: conf.clone(), content }, remove],
                _ => vec![remove],
            }
        }
        Parsed::List { .. } => match conflist::without_ours(target.text, ours) {
            Some(content) => vec![FileOp::Write { name: target.name.to_string(), content }],
            None => Vec::new(),
        },
    }
}

/// The `.conf` a wrapper of ours was made from, if `list` is one.
fn wrapper_of(list: &str, content: &Result<Vec<u8>, String>, ours: &Ours) -> Option<String> {
    match conflist::classify(list, content.as_ref().ok()?, ours).ok()? {
        Parsed::List { wrapped, .. } => wrapped,
        Parsed::Conf { .. } => None,
    }
}

/// Standalone mode (Multus): our conf, verbatim, under `name`.
pub fn standalone(name: &str, snap: &Snapshot, ours: &Ours) -> Plan {
    let file = name.to_string();
    match snap.get(name) {
        Some(Ok(bytes)) if bytes == ours.text.as_bytes() => Plan::InPlace { file, primary: Vec::new() },
        _ => Plan::Apply {
            ops: vec![FileOp::Write { name: file.clone(), content: ours.text.clone() }],
            file,
            primary: Vec::new(),
        },
    }
}

/// Standalone mode, on removal: delete our conf, unless something else now stands
/// under its name.
pub fn standalone_removal(name: &str, snap: &Snapshot, ours: &Ours) -> Vec<FileOp> {
    match snap.get(name) {
        Some(Ok(bytes)) if conflist::classify(name, bytes, ours).is_ok_and(|p| p.only_ours(ours)) => {
            vec![FileOp::Remove { name: name.to_string() }]
        }
        _ => Vec::new(),
    }
}

/// What a stale configuration file of our network is renamed to: runtimes and Multus
/// read only `.conf`, `.conflist` and `.json` files, so it is out of use, and nothing
/// its owner wrote is lost.
pub const SET_ASIDE_SUFFIX: &str = ".disabled-by-kong-mesh-cni";

/// Configuration files of our network that we did not write, to be set aside: two
/// files for one network make Multus (which takes the first in sorted order) and
/// runtimes use whichever sorts first, e.g. Kuma's Go installer's standalone
/// `YYY-kuma-cni.conflist` left by a killed pod. `owned` is the file we write (the
/// standalone conf, or the conflist our entry is in). In standalone mode any other file
/// naming our network is one; in chained mode, where our template's `name` means
/// nothing and could be anything, only a file holding nothing but our plugin is.
pub fn strays(owned: Option<&str>, standalone: bool, snap: &Snapshot, ours: &Ours) -> Vec<String> {
    let Some(network) = ours.conf.get("name").and_then(serde_json::Value::as_str) else {
        return Vec::new();
    };
    snap.iter()
        .filter(|(name, _)| Some(name.as_str()) != owned && conflist::is_conf_name(name))
        .filter_map(|(name, content)| {
            let parsed = conflist::classify(name, content.as_ref().ok()?, ours).ok()?;
            let value = match &parsed {
                Parsed::Conf { value } | Parsed::List { value, .. } => value,
            };
            (value.get("name").and_then(serde_json::Value::as_str) == Some(network)
                && (standalone || parsed.only_ours(ours)))
            .then(|| name.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::DEFAULT_TEMPLATE;

    fn ours() -> Ours {
        Ours::render(DEFAULT_TEMPLATE, "/etc/cni/net.d/kc").unwrap()
    }

    fn snap(files: &[(&str, &str)]) -> Snapshot {
        files.iter().map(|(n, c)| (n.to_string(), Ok(c.as_bytes().to_vec()))).collect()
    }

    /// Applies ops to a snapshot, as the I/O edge does to the directory.
    fn apply(mut s: Snapshot, ops: &[FileOp]) -> Snapshot {
        for op in ops {
            match op {
                FileOp::Write { name, content } => s.insert(name.clone(), Ok(content.clone().into_bytes())),
                FileOp::Remove { name } => s.remove(name),
            };
        }
        s
    }

    const CALICO: &str =
        "{\"cniVersion\": \"0.3.1\", \"plugins\": [{\"type\": \"calico\"}, {\"type\": \"portmap\"}]}\n";
    const FLANNEL: &str = "{\"cniVersion\": \"0.3.1\", \"name\": \"cbr0\", \"type\": \"flannel\"}\n";

    #[test]
    fn auto_detect_skips_invalid_foreign_and_our_standalone_files() {
        let o = ours();
        let s = snap(&[
            ("00-broken.conflist", "{\"plugins\": ["),
            ("01-kuma-cni.conf", &o.text),
            ("02-notes.txt", "hello"),
            ("05-empty.conflist", "{\"plugins\": []}"),
            ("10-calico.conflist", CALICO),
            ("20-other.conf", FLANNEL),
        ]);
        match chain(None, &s, &o) {
            Plan::Apply { file, primary, .. } => assert_eq!(
                (file.as_str(), primary),
                ("10-calico.conflist", vec!["calico".to_string(), "portmap".to_string()])
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nothing_valid_means_waiting_with_the_reasons() {
        let o = ours();
        let Plan::Waiting { reason } = chain(None, &snap(&[("10-x.conflist", "nope")]), &o) else { panic!() };
        assert!(reason.contains("10-x.conflist: not valid JSON"), "{reason}");
        assert!(matches!(chain(Some("10-calico.conflist"), &Snapshot::new(), &o), Plan::Waiting { .. }));
    }

    #[test]
    fn named_invalid_file_is_refused_not_skipped() {
        let o = ours();
        let s = snap(&[("10-calico.conflist", "{\"plugins\": [{\"type\":"), ("20-b.conflist", CALICO)]);
        let Plan::Refused { file, reason } = chain(Some("10-calico.conflist"), &s, &o) else { panic!() };
        assert_eq!(file, "10-calico.conflist");
        assert!(reason.contains("not valid JSON"));
    }

    #[test]
    fn conf_is_wrapped_then_in_place_then_restored() {
        let o = ours();
        let s = snap(&[("10-flannel.conf", FLANNEL)]);
        let Plan::Apply { file, ops, .. } = chain(Some("10-flannel.conf"), &s, &o) else { panic!() };
        assert_eq!(file, "10-flannel.conflist");
        let s2 = apply(s.clone(), &ops);
        assert!(!s2.contains_key("10-flannel.conf"));
        // X.conf falls back to X.conflist, and auto-detect finds the wrapper too.
        assert!(chain(Some("10-flannel.conf"), &s2, &o).is_in_place());
        assert!(chain(None, &s2, &o).is_in_place());
        assert_eq!(apply(s2.clone(), &unchain(Some("10-flannel.conf"), &s2, &o)), s);
        assert_eq!(apply(s2.clone(), &unchain(None, &s2, &o)), s);
    }

    #[test]
    fn primary_rewriting_its_conf_over_our_wrapper_is_rewrapped() {
        let o = ours();
        let s = snap(&[("10-flannel.conf", FLANNEL)]);
        let Plan::Apply { ops, .. } = chain(None, &s, &o) else { panic!() };
        let newer = FLANNEL.replace("cbr0", "cbr1");
        let mut s2 = apply(s, &ops);
        s2.insert("10-flannel.conf".into(), Ok(newer.clone().into_bytes()));
        let Plan::Apply { ops, .. } = chain(None, &s2, &o) else { panic!() };
        let s3 = apply(s2.clone(), &ops);
        assert!(s3["10-flannel.conflist"].as_ref().unwrap().windows(4).any(|w| w == b"cbr1"));
        // Removal while the primary's newer .conf is there: just drop the stale wrapper.
        assert_eq!(apply(s2.clone(), &unchain(None, &s2, &o)), snap(&[("10-flannel.conf", &newer)]));
    }

    #[test]
    fn a_foreign_conflist_next_to_the_conf_is_never_overwritten() {
        let o = ours();
        let s = snap(&[("10-flannel.conf", FLANNEL), ("10-flannel.conflist", CALICO)]);
        assert!(matches!(chain(Some("10-flannel.conf"), &s, &o), Plan::Refused { .. }));
    }

    #[test]
    fn conflist_merge_is_in_place_after_and_restored_byte_for_byte() {
        let o = ours();
        let s = snap(&[("10-calico.conflist", CALICO)]);
        let Plan::Apply { ops, .. } = chain(Some("10-calico.conflist"), &s, &o) else { panic!() };
        let s2 = apply(s.clone(), &ops);
        assert!(chain(Some("10-calico.conflist"), &s2, &o).is_in_place());
        assert_eq!(apply(s2.clone(), &unchain(Some("10-calico.conflist"), &s2, &o)), s);
        assert!(unchain(Some("10-calico.conflist"), &s, &o).is_empty());
    }

    #[test]
    fn standalone_is_verbatim_repaired_and_removed_only_if_ours() {
        let o = ours();
        let Plan::Apply { ops, .. } = standalone("kuma-cni.conf", &Snapshot::new(), &o) else { panic!() };
        assert_eq!(ops, vec![FileOp::Write { name: "kuma-cni.conf".into(), content: o.text.clone() }]);
        let s = snap(&[("kuma-cni.conf", &o.text)]);
        assert!(standalone("kuma-cni.conf", &s, &o).is_in_place());
        assert!(matches!(standalone("kuma-cni.conf", &snap(&[("kuma-cni.conf", "{}")]), &o), Plan::Apply { .. }));
        assert_eq!(standalone_removal("kuma-cni.conf", &s, &o).len(), 1);
        assert!(standalone_removal("kuma-cni.conf", &snap(&[("kuma-cni.conf", FLANNEL)]), &o).is_empty());
    }

    #[test]
    fn stale_confs_of_our_network_are_strays_and_nothing_else_is() {
        let o = ours();
        // Kuma's Go installer's standalone conf (Multus mode, CNI_CONF_NAME unset).
        let go = r#"{"cniVersion":"0.3.1","name":"kuma-cni","plugins":[{"type":"kuma-cni","log_level":"info"}]}"#;
        let foreign_named_ours = r#"{"cniVersion":"0.3.1","name":"kuma-cni","type":"macvlan"}"#;
        let s = snap(&[
            ("00-multus.conf", r#"{"cniVersion":"0.3.1","name":"multus","type":"multus"}"#),
            ("10-calico.conflist", CALICO),
            ("YYY-kuma-cni.conflist", go),
            ("50-other.conf", foreign_named_ours),
            ("kuma-cni.conf", &o.text),
            ("broken.conflist", "{"),
        ]);
        assert_eq!(strays(Some("kuma-cni.conf"), true, &s, &o), ["50-other.conf", "YYY-kuma-cni.conflist"]);
        // Chained: only files holding nothing but our plugin; here also our old standalone conf.
        assert_eq!(strays(Some("10-calico.conflist"), false, &s, &o), ["YYY-kuma-cni.conflist", "kuma-cni.conf"]);
        let aside = format!("YYY-kuma-cni.conflist{SET_ASIDE_SUFFIX}");
        assert!(!crate::conflist::is_conf_name(&aside) && !aside.ends_with(".json"), "runtimes ignore it");
    }
}
