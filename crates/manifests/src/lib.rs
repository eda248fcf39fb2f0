//! The Kong Mesh CNI's Helm chart (`deployments/charts/kong-mesh-cni`, embedded at
//! build time) and a renderer for the Go-template subset it is written in, so that
//! `kong-mesh-cni manifests --preset NAME` prints what `helm template` prints for that
//! preset: one source of truth, the chart's own files.
//!
//! The subset (documented at the top of the chart's `_helpers.tpl`, and nothing more is
//! accepted: anything else fails to parse or to run, never renders differently):
//!
//! - actions `{{ }}` with `{{-`/`-}}` trimming, `{{/* comments */}}`;
//! - `if`/`else if`/`else`, `with`/`else`, `range` (lists, maps in key order, `$v :=`,
//!   `$k, $v :=`, `else`), `define` + `include`;
//! - variables (`$x := `, `$x = `, `$`), pipelines, parenthesized pipelines, fields on
//!   `.`, variables and parentheses; string, number, bool and nil literals;
//! - `.Values`, `.Chart.{Name,Version,AppVersion}`, `.Release.{Name,Namespace,Service}`,
//!   `.Files.Get`;
//! - functions: default, quote, toYaml, toJson, fromYaml, nindent, indent, required,
//!   fail, eq, ne, and, or, not, list, printf (%s %d %v %q), trimSuffix, join,
//!   sha256sum.
//!
//! Values follow Helm: chart defaults, then the preset and `-f` files (deep-merged),
//! then `--set`/`--set-string` (Helm's syntax, [`strvals`]), a null removing a default.
//! Numbers from files are float64 and from `--set` int64, as in Helm, so they print the
//! same. YAML 1.1's boolean spellings (y/n/yes/no/on/off), which Helm reads as booleans
//! unless quoted, are refused in values files and `fromYaml` (serde_norway cannot tell
//! whether they were quoted). Output documents are split and ordered as Helm orders them (by kind for
//! install, then by template file).

#![forbid(unsafe_code)]

mod exec;
mod funcs;
mod lex;
mod parse;
mod render;
mod schema;
pub mod strvals;
pub mod value;

pub use render::{Chart, Manifest, Options, to_stream};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("parse error at {0}")]
    Parse(String),
    /// Like Helm's: `fail` and `required` messages appear as the chart wrote them.
    #[error("execution error at ({at}): {msg}")]
    Exec { at: String, msg: String },
    #[error("--set {0}")]
    Set(String),
    #[error("{0}")]
    Values(String),
    #[error("unknown preset {0:?} (presets: {1})")]
    Preset(String, String),
    #[error("YAML parse error on {0}: {1}")]
    Manifest(String, String),
}
