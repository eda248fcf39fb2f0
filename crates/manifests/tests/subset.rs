//! The template subset itself against Helm, beyond what the chart uses today: a
//! throwaway chart whose ConfigMap holds one rendered snippet per construct (ranges,
//! scoping, printing of numbers from files and from --set, quoting, default, and/or,
//! toYaml/toJson, Files.Get, ...), rendered by both and compared key by key. Future
//! chart edits can rely on any of these behaving as in Helm.

mod common;

use std::collections::BTreeMap;

use common::*;
use manifests::{Chart, Options, to_stream};

const VALUES: &str = r#"
list: [a, b, c]
empty: []
emptyString: ""
zero: 0
falsy: false
map: {z: 1, a: two, m: [x, w]}
big: 1000000
half: 0.5
count: 3
nested: {inner: {value: "<tag> & \"quoted\"\nline"}}
name: kong-mesh-cni.conf
"#;

/// One define per construct; the ConfigMap quotes each result.
const SNIPPETS: &[(&str, &str)] = &[
    ("rangeList", r#"{{ range $i, $v := .Values.list }}{{ $i }}={{ $v }};{{ else }}empty{{ end }}"#),
    ("rangeEmpty", r#"{{ range .Values.empty }}x{{ else }}empty{{ end }}"#),
    ("rangeMap", r#"{{ range $k, $v := .Values.map }}{{ $k }}:{{ $v }} {{ end }}"#),
    ("rangeDot", r#"{{ range .Values.list }}[{{ . }}|{{ $.Values.count }}]{{ end }}"#),
    ("withElse", r#"{{ with .Values.missing }}set{{ else }}none{{ end }}/{{ with .Values.map }}{{ .a }}{{ end }}"#),
    (
        "ifChain",
        r#"{{ if eq .Values.name "x" }}1{{ else if and .Values.list (not .Values.falsy) }}2{{ else }}3{{ end }}"#,
    ),
    (
        "scoping",
        r#"{{ $x := "a" }}{{ if true }}{{ $x = "b" }}{{ $y := "c" }}{{ $y }}{{ end }}{{ $x }}{{ range .Values.list }}{{ $x = . }}{{ end }}{{ $x }}"#,
    ),
    ("printf", r#"{{ printf "%s-%d-%v-%q-%v-%v-%%" "s" .Values.setInt .Values.half "q" .Values.big .Values.falsy }}"#),
    ("printfMismatch", r#"{{ printf "%d %s" .Values.count .Values.setInt }}"#),
    (
        "printNumbers",
        r#"{{ .Values.big }} {{ .Values.half }} {{ .Values.count }} {{ .Values.setInt }} {{ .Values.setBig }} {{ .Values.setFloat }}"#,
    ),
    ("quote", r#"{{ quote .Values.falsy .Values.count "a\"b" .Values.nested.inner.value }}"#),
    (
        "defaults",
        r#"{{ default "d1" .Values.emptyString }} {{ default "d2" .Values.zero }} {{ default "d3" .Values.falsy }} {{ default "d4" .Values.empty }} {{ .Values.missing | default "d5" }} {{ default "d6" .Values.name }}"#,
    ),
    (
        "andOr",
        r#"{{ or .Values.emptyString "fallback" }} {{ and "a" "b" }} {{ and .Values.zero "never" }} {{ or .Values.missing .Values.falsy }}"#,
    ),
    ("toYaml", r#"{{ toYaml .Values.map | nindent 2 }}{{ toYaml .Values.list | indent 4 }}"#),
    (
        "toJson",
        r#"{{ toJson .Values.nested }} {{ toJson .Values.map }} {{ toJson .Values.big }} {{ toJson .Values.empty }}"#,
    ),
    ("trimSuffix", r#"{{ trimSuffix ".conf" .Values.name }} {{ .Values.name | trimSuffix ".conflist" }}"#),
    ("join", r#"{{ join "," .Values.list }} {{ .Values.list | join "-" }} [{{ join "," list }}]"#),
    ("required", r#"{{ required "needed" .Values.name }}"#),
    ("nilPrint", r#"[{{ .Values.missing }}]"#),
    (
        "paren",
        r#"{{ (fromYaml "a: {b: c}").a.b }} {{ if (fromYaml "- x").Error }}error{{ end }} {{ (fromYaml "k: 10").k }}"#,
    ),
    ("files", r#"{{ .Files.Get "files/data.txt" }}|{{ .Files.Get "files/none.txt" }}|"#),
    ("sha", r#"{{ "abc" | sha256sum }}"#),
    ("list", r#"{{ list 1 "a" true | toJson }} {{ list | toJson }}"#),
    (
        "eqMulti",
        r#"{{ eq .Values.name "a" "kong-mesh-cni.conf" }} {{ ne .Values.count 3.0 }} {{ eq .Values.missing "x" }}"#,
    ),
    (
        "chartRelease",
        r#"{{ .Chart.Name }} {{ .Chart.Version }} {{ .Release.Name }} {{ .Release.Namespace }} {{ .Release.Service }}"#,
    ),
    ("comment", "a{{/* gone */}}b {{- /* trims */ -}} c"),
];

fn write_chart(dir: &std::path::Path) -> BTreeMap<String, String> {
    let mut defines = String::new();
    let mut data = String::new();
    for (name, body) in SNIPPETS {
        defines.push_str(&format!("{{{{- define \"t.{name}\" -}}}}{body}{{{{- end }}}}\n"));
        data.push_str(&format!("  {name}: {{{{ include \"t.{name}\" . | quote }}}}\n"));
    }
    let files = BTreeMap::from([
        ("Chart.yaml".to_string(), "apiVersion: v2\nname: subset\nversion: 1.2.3\nappVersion: \"4.5\"\n".to_string()),
        ("values.yaml".into(), VALUES.into()),
        ("files/data.txt".into(), "some data".into()),
        ("templates/_defs.tpl".into(), defines),
        (
            "templates/cm.yaml".into(),
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: subset\ndata:\n{data}"),
        ),
    ]);
    for (path, text) in &files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    files
}

#[test]
fn each_construct_renders_as_in_helm() {
    let Some(helm) = helm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let files = write_chart(dir.path());
    let set = "setInt=42,setBig=1000000,setFloat=1.5";
    let out = helm_cmd(helm, &["template", "rel", dir.path().to_str().unwrap(), "--namespace", "ns1", "--set", set]);
    assert!(out.status.success(), "helm: {}", String::from_utf8_lossy(&out.stderr));
    let theirs = objects(&String::from_utf8(out.stdout).unwrap());
    let opts = Options {
        release_name: "rel".into(),
        namespace: Some("ns1".into()),
        set: vec![set.into()],
        ..Options::default()
    };
    let ours = objects(&to_stream(&Chart::from_files(files).unwrap().render(&opts).unwrap()));
    let (ours, theirs) = (&ours["ConfigMap//subset"]["data"], &theirs["ConfigMap//subset"]["data"]);
    let mut differ = Vec::new();
    for (name, _) in SNIPPETS {
        if ours[name] != theirs[name] {
            differ.push(format!("{name}:\n  ours: {:?}\n  helm: {:?}", ours[name], theirs[name]));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    assert_eq!(ours, theirs);
}

#[test]
fn yaml_1_1_booleans_are_refused_rather_than_read_differently() {
    let Some(helm) = helm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut files = write_chart(dir.path());
    let extra = dir.path().join("extra.yaml");
    std::fs::write(&extra, "flag: on\n").unwrap();
    // Helm reads it as a boolean...
    files.insert(
        "templates/flag.yaml".into(),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: flag\ndata:\n  flag: {{ .Values.flag | quote }}\n".into(),
    );
    std::fs::write(dir.path().join("templates/flag.yaml"), &files["templates/flag.yaml"]).unwrap();
    let out = helm_cmd(helm, &["template", "rel", dir.path().to_str().unwrap(), "-f", extra.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("flag: \"true\""));
    // ...and ours says why it will not guess.
    let opts = Options { values: vec!["flag: on\n".into()], ..Options::default() };
    let err = Chart::from_files(files).unwrap().render(&opts).unwrap_err().to_string();
    assert!(err.contains("\"on\" is a boolean in Helm's YAML 1.1"), "{err}");
}
