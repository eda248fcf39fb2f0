use cni::proto::result::{pass_on, version_info};
use cni::proto::{Command, Env, NetConf, code};
use serde_json::{Value, json};

fn env(pairs: &[(&str, &str)]) -> Result<Env, cni::proto::CniError> {
    let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Env::from_vars(|k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
}

#[test]
fn environment() {
    let e = env(&[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"),
    ])
    .unwrap();
    assert_eq!(e.command, Command::Add);
    assert_eq!((e.arg("K8S_POD_NAMESPACE"), e.arg("K8S_POD_NAME"), e.arg("NOPE")), ("shop", "web", ""));

    let err = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc")]).unwrap_err();
    assert_eq!(err.code, code::INVALID_ENVIRONMENT);
    assert!(err.details.contains("CNI_NETNS") && err.details.contains("CNI_IFNAME"), "{err}");
    assert_eq!(env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code, code::INVALID_ENVIRONMENT);
    // DEL without a namespace is allowed; STATUS and GC need nothing.
    assert!(env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "a"), ("CNI_IFNAME", "eth0")]).is_ok());
    assert!(env(&[("CNI_COMMAND", "STATUS")]).is_ok());
    assert_eq!(env(&[("CNI_COMMAND", "GC"), ("CNI_ARGS", "broken")]).unwrap_err().code, code::INVALID_ENVIRONMENT);
}

#[test]
fn configuration() {
    let c = NetConf::parse(br#"{"cniVersion":"0.4.0","name":"n","type":"kong-mesh-cni","x":{"y":1}}"#).unwrap();
    assert_eq!((c.cni_version.as_str(), c.plugin_type.as_str()), ("0.4.0", "kong-mesh-cni"));
    assert_eq!(c.raw["x"]["y"], 1);
    let c = NetConf::parse(br#"{"cniVersions":["0.3.1","1.1.0","9.9.9"],"type":"t"}"#).unwrap();
    assert_eq!(c.cni_version, "1.1.0");

    let cases: &[(&[u8], u32)] = &[
        (b"not json", code::DECODE),
        (br#"{"cniVersion":"1.0.0","type":"t""#, code::DECODE),
        (b"[1,2]", code::DECODE),
        (br#"{"cniVersion":"0.2.0","type":"t"}"#, code::INCOMPATIBLE_VERSION),
        (br#"{"type":"t"}"#, code::INCOMPATIBLE_VERSION),
        (br#"{"cniVersion":1,"type":"t"}"#, code::INVALID_CONFIG),
        (br#"{"cniVersion":"1.0.0","type":5}"#, code::INVALID_CONFIG),
        (br#"{"cniVersion":"1.0.0"}"#, code::INVALID_CONFIG),
        (br#"{"cniVersion":"1.0.0","type":"t","prevResult":"x"}"#, code::INVALID_CONFIG),
        (br#"{"cniVersions":"1.0.0","type":"t"}"#, code::INVALID_CONFIG),
    ];
    for (input, want) in cases {
        let err = NetConf::parse(input).unwrap_err();
        assert_eq!(err.code, *want, "{}: {err}", String::from_utf8_lossy(input));
    }
    let huge = vec![b' '; 10 << 20];
    assert_eq!(NetConf::parse(&huge).unwrap_err().code, code::DECODE);
}

fn prev(version: &str, with_ip_version: bool) -> Value {
    let mut ip = json!({"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 2});
    let mut ip6 = json!({"address": "fd00::5/64", "interface": 2});
    if with_ip_version {
        ip["version"] = json!("4");
        ip6["version"] = json!("6");
    }
    json!({
        "cniVersion": version,
        "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"}, {"name": "eth0", "sandbox": "/var/run/netns/x"}],
        "ips": [ip, ip6],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.96.0.10"]},
        "vendorExtension": {"keep": [1, 2.50, 12345678901234567890u64]}
    })
}

#[test]
fn results_round_trip_every_version() {
    for version in cni::proto::version::SUPPORTED {
        let v03 = !version.starts_with('1');
        let input = prev(version, v03);
        assert_eq!(pass_on(Some(&input), version).unwrap(), input, "{version}: unchanged in its own version");
    }
    let down = pass_on(Some(&prev("1.1.0", false)), "0.3.1").unwrap();
    assert_eq!(down, prev("0.3.1", true));
    let up = pass_on(Some(&prev("0.4.0", true)), "1.0.0").unwrap();
    assert_eq!(up, prev("1.0.0", false));
    assert_eq!(pass_on(None, "1.0.0").unwrap(), json!({"cniVersion": "1.0.0", "dns": {}}));
    assert_eq!(pass_on(Some(&json!({"cniVersion": "0.2.0"})), "1.0.0").unwrap_err().code, code::INVALID_CONFIG);
}

#[test]
fn numbers_and_key_order_survive() {
    let text = r#"{"cniVersion":"1.0.0","zeta":1,"alpha":0.1000000000000000055511151231257827,"ips":[]}"#;
    let v: Value = serde_json::from_str(text).unwrap();
    assert_eq!(pass_on(Some(&v), "1.0.0").unwrap().to_string(), text);
}

#[test]
fn version_answer() {
    let v = version_info();
    assert_eq!(v["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
}
