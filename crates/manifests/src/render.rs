//! The chart: its files, values (defaults, preset, `-f`, `--set`, coalesced as Helm
//! does), rendering of every template, and the manifests split and ordered like
//! `helm template` prints them.

use std::collections::{BTreeMap, HashMap};

use crate::Error;
use crate::exec::{Define, Exec};
use crate::parse;
use crate::schema;
use crate::strvals;
use crate::value::Value;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/chart_files.rs"));
}

type Map = BTreeMap<String, Value>;

pub struct Chart {
    files: BTreeMap<String, String>,
    name: String,
    version: String,
    app_version: String,
}

/// What to render: like `helm template RELEASE CHART -n NS -f preset -f ... --set ...`.
#[derive(Debug, Clone)]
pub struct Options {
    pub release_name: String,
    /// Helm's release namespace; also the chart's `cni.namespace` (before `--set`).
    pub namespace: Option<String>,
    pub preset: Option<String>,
    /// Contents of values files, applied after the preset, in order.
    pub values: Vec<String>,
    pub set: Vec<String>,
    pub set_string: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            release_name: "kong-mesh-cni".into(),
            namespace: None,
            preset: None,
            values: Vec::new(),
            set: Vec::new(),
            set_string: Vec::new(),
        }
    }
}

/// One rendered object.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// `kong-mesh-cni/templates/<file>`, as in Helm's `# Source:` line.
    pub source: String,
    pub kind: String,
    pub name: String,
    pub content: String,
}

/// Helm's install order (releaseutil.InstallOrder): kinds not listed come after these.
const INSTALL_ORDER: &[&str] = &[
    "PriorityClass",
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodSecurityPolicy",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "SecretList",
    "ConfigMap",
    "StorageClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleList",
    "ClusterRoleBinding",
    "ClusterRoleBindingList",
    "Role",
    "RoleList",
    "RoleBinding",
    "RoleBindingList",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicationController",
    "ReplicaSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
    "IngressClass",
    "Ingress",
    "APIService",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
];

impl Chart {
    /// The chart compiled into this binary.
    pub fn embedded() -> Chart {
        let files = embedded::FILES.iter().map(|(p, c)| (p.to_string(), c.to_string())).collect();
        Chart::from_files(files).expect("the embedded chart has a valid Chart.yaml")
    }

    /// A chart from its files (paths relative to the chart dir).
    pub fn from_files(files: BTreeMap<String, String>) -> Result<Chart, Error> {
        let meta: serde_norway::Value = serde_norway::from_str(files.get("Chart.yaml").map_or("", String::as_str))
            .map_err(|e| Error::Values(format!("Chart.yaml: {e}")))?;
        let field = |k: &str| meta.get(k).and_then(serde_norway::Value::as_str).unwrap_or_default().to_owned();
        let (name, version, app_version) = (field("name"), field("version"), field("appVersion"));
        if name.is_empty() || version.is_empty() {
            return Err(Error::Values("Chart.yaml: name and version are required".into()));
        }
        Ok(Chart { files, name, version, app_version })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The chart's files, as embedded.
    pub fn files(&self) -> &BTreeMap<String, String> {
        &self.files
    }

    /// Preset names (the files in presets/), sorted, with the first line of their comment.
    pub fn presets(&self) -> Vec<(String, String)> {
        let mut presets: Vec<(String, String)> = self
            .files
            .iter()
            .filter_map(|(path, text)| {
                let name = path.strip_prefix("presets/")?.strip_suffix(".yaml")?;
                let summary = text.lines().next().and_then(|l| l.strip_prefix("# ")).unwrap_or_default();
                Some((name.to_owned(), summary.to_owned()))
            })
            .collect();
        presets.sort();
        presets
    }

    /// The values file of a preset.
    pub fn preset(&self, name: &str) -> Result<&str, Error> {
        self.files.get(&format!("presets/{name}.yaml")).map(String::as_str).ok_or_else(|| {
            let names: Vec<String> = self.presets().into_iter().map(|(n, _)| n).collect();
            Error::Preset(name.to_owned(), names.join(", "))
        })
    }

    /// The values the templates see: chart defaults coalesced with the user's.
    pub fn values(&self, opts: &Options) -> Result<Value, Error> {
        let mut user = Map::new();
        let preset = opts
            .preset
            .as_deref()
            .map(|p| self.preset(p).map(|t| (format!("preset {p}"), t.to_owned())))
            .transpose()?;
        let files = opts.values.iter().enumerate().map(|(i, t)| (format!("values file #{}", i + 1), t.clone()));
        for (what, text) in preset.into_iter().chain(files) {
            merge(&mut user, yaml_map(&text).map_err(|e| Error::Values(format!("{what}: {e}")))?);
        }
        if let Some(ns) = &opts.namespace {
            strvals::parse_into(
                &format!("cni.namespace={}", ns.replace('\\', "\\\\").replace(',', "\\,")),
                &mut user,
                true,
            )?;
        }
        for arg in &opts.set {
            strvals::parse_into(arg, &mut user, false)?;
        }
        for arg in &opts.set_string {
            strvals::parse_into(arg, &mut user, true)?;
        }
        let defaults = yaml_map(self.files.get("values.yaml").map_or("", String::as_str))
            .map_err(|e| Error::Values(format!("values.yaml: {e}")))?;
        Ok(Value::Map(coalesce(user, defaults)))
    }

    /// Renders every template: the manifests in Helm's order.
    pub fn render(&self, opts: &Options) -> Result<Vec<Manifest>, Error> {
        let values = self.values(opts)?;
        self.validate(&values)?;
        let mut defines = HashMap::new();
        let mut bodies = Vec::new();
        for (path, text) in self.files.iter().filter(|(p, _)| p.starts_with("templates/")) {
            let file = format!("{}/{path}", self.name);
            let parsed = parse::parse(&file, text)?;
            for (name, body) in parsed.defines {
                defines.insert(name, Define { file: file.clone(), body });
            }
            let base = path.rsplit('/').next().unwrap_or_default();
            let is_manifest = (path.ends_with(".yaml") || path.ends_with(".yml")) && !base.starts_with('_');
            if is_manifest {
                bodies.push((file, parsed.body));
            }
        }
        let exec = Exec { defines: &defines, files: &self.files };
        let mut manifests = Vec::new();
        for (file, body) in &bodies {
            let data = self.top_level(&values, opts, file);
            for content in split(&exec.run(file, body, &data)?) {
                let head: serde_norway::Value =
                    serde_norway::from_str(&content).map_err(|e| Error::Manifest(file.clone(), e.to_string()))?;
                let get = |v: Option<&serde_norway::Value>| {
                    v.and_then(serde_norway::Value::as_str).unwrap_or_default().to_owned()
                };
                let kind = get(head.get("kind"));
                let name = get(head.get("metadata").and_then(|m| m.get("name")));
                manifests.push(Manifest { source: file.clone(), kind, name, content });
            }
        }
        let rank = |kind: &str| INSTALL_ORDER.iter().position(|k| *k == kind).unwrap_or(INSTALL_ORDER.len());
        manifests.sort_by(|a, b| {
            let (ra, rb) = (rank(&a.kind), rank(&b.kind));
            ra.cmp(&rb)
                .then_with(|| if ra == INSTALL_ORDER.len() { a.kind.cmp(&b.kind) } else { std::cmp::Ordering::Equal })
        });
        Ok(manifests)
    }

    /// Helm's check of the values against `values.schema.json` (when the chart has one).
    pub fn validate(&self, values: &Value) -> Result<(), Error> {
        let Some(text) = self.files.get("values.schema.json") else { return Ok(()) };
        let schema = schema::parse(text).map_err(Error::Values)?;
        match schema::validate(&schema, values).as_slice() {
            [] => Ok(()),
            failures => Err(Error::Values(schema::message(&self.name, failures))),
        }
    }

    fn top_level(&self, values: &Value, opts: &Options, file: &str) -> Value {
        let s = |v: &str| Value::Str(v.to_owned());
        let map =
            |entries: Vec<(&str, Value)>| Value::Map(entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
        map(vec![
            ("Values", values.clone()),
            (
                "Chart",
                map(vec![("Name", s(&self.name)), ("Version", s(&self.version)), ("AppVersion", s(&self.app_version))]),
            ),
            (
                "Release",
                map(vec![
                    ("Name", s(&opts.release_name)),
                    ("Namespace", s(opts.namespace.as_deref().unwrap_or("default"))),
                    ("Service", s("Helm")),
                    ("IsInstall", Value::Bool(true)),
                    ("IsUpgrade", Value::Bool(false)),
                    ("Revision", Value::Int(1)),
                ]),
            ),
            ("Template", map(vec![("Name", s(file)), ("BasePath", s(&format!("{}/templates", self.name)))])),
            ("Files", Value::Files),
        ])
    }
}

/// `helm template`'s output for these manifests.
pub fn to_stream(manifests: &[Manifest]) -> String {
    manifests.iter().map(|m| format!("---\n# Source: {}\n{}\n", m.source, m.content)).collect()
}

fn yaml_map(text: &str) -> Result<Map, String> {
    match serde_norway::from_str::<serde_norway::Value>(text).map_err(|e| e.to_string())? {
        serde_norway::Value::Null => Ok(Map::new()),
        v @ serde_norway::Value::Mapping(_) if crate::value::yaml11_ambiguity(&v).is_some() => {
            Err(crate::value::yaml11_message(&crate::value::yaml11_ambiguity(&v).unwrap_or_default()))
        }
        v @ serde_norway::Value::Mapping(_) => match Value::from_yaml(v) {
            Value::Map(m) => Ok(m),
            _ => unreachable!("a mapping converts to a map"),
        },
        _ => Err("values must be a YAML mapping".into()),
    }
}

/// `-f` files: later ones win, maps merge key by key.
fn merge(dst: &mut Map, src: Map) {
    for (k, v) in src {
        match (dst.get_mut(&k), v) {
            (Some(Value::Map(d)), Value::Map(s)) => merge(d, s),
            (_, v) => {
                dst.insert(k, v);
            }
        }
    }
}

/// Helm's coalescing of user values over chart defaults: the user's value wins, maps
/// merge, and a user's null removes the default.
fn coalesce(mut user: Map, defaults: Map) -> Map {
    for (k, default) in defaults {
        match user.remove(&k) {
            None => {
                user.insert(k, default);
            }
            Some(Value::Nil) => {}
            Some(Value::Map(u)) => {
                let merged = match default {
                    Value::Map(d) => coalesce(u, d),
                    _ => u,
                };
                user.insert(k, Value::Map(merged));
            }
            Some(v) => {
                user.insert(k, v);
            }
        }
    }
    user
}

/// Helm's SplitManifests: documents start at lines beginning with `---`; blank ones
/// are dropped.
fn split(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.split_inclusive('\n') {
        match line.strip_prefix("---") {
            Some(rest) => docs.push(rest.trim_start().to_owned()),
            None => docs.last_mut().expect("one doc").push_str(line),
        }
    }
    docs.into_iter().map(|d| d.trim().to_owned()).filter(|d| !d.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_and_merge_like_helm() {
        let m = |t: &str| yaml_map(t).unwrap();
        let mut user = m("{a: {b: 1}, l: [1]}");
        merge(&mut user, m("{a: {c: 2}, l: [2, 3]}"));
        assert_eq!(user, m("{a: {b: 1, c: 2}, l: [2, 3]}"));
        let out = coalesce(m("{a: {b: null, c: 5}, d: x}"), m("{a: {b: 1, c: 2, e: 3}, d: {f: 1}, g: 4}"));
        assert_eq!(out, m("{a: {c: 5, e: 3}, d: x, g: 4}"));
    }

    #[test]
    fn split_like_helm() {
        assert_eq!(split("---\n# c\na: 1\n---   \n\n--- b: 2\n"), vec!["# c\na: 1".to_string(), "b: 2".into()]);
    }
}
