{{/*
Template subset. These templates are also rendered by `kong-mesh-cni manifests`
(crates/manifests), which implements only this subset of Helm's templates:
  actions: {{ }}, {{- -}}, comments, if/else if/else, with/else, range (lists, maps,
    `$k, $v :=`), define/include, variables ($x := / $x =, $), parenthesized pipelines;
  objects: .Values, .Chart.{Name,Version,AppVersion}, .Release.{Name,Namespace,Service},
    .Files.Get;
  values: checked against values.schema.json first, which uses only type, properties,
    additionalProperties, items, enum, minimum, maximum (and description);
  functions: default, quote, toYaml, toJson, fromYaml, nindent, indent, required, fail,
    eq, ne, and, or, not, list, printf (%s %d %v %q), trimSuffix, sha256sum, include.
Use nothing else here: crates/manifests's tests render every preset with both and compare.
*/}}

{{/* Labels on every object (not .Chart.Name: an umbrella's alias renames the chart). */}}
{{- define "kong-mesh-cni.labels" -}}
app.kubernetes.io/name: kong-mesh-cni
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kong-mesh
{{- end }}

{{/*
The image of both the installer and the controller. As in Kuma's chart: registry and
tag fall back to global.image.*, the tag then to the chart's appVersion.
*/}}
{{- define "kong-mesh-cni.image" -}}
{{- $image := .Values.cni.image -}}
{{- $repository := required "cni.image.repository is required" $image.repository -}}
{{- $registry := default .Values.global.image.registry $image.registry -}}
{{- $tag := default (default .Chart.AppVersion .Values.global.image.tag) $image.tag -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $registry) $repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}
{{- end }}

{{/* Kuma's key (imagePullPolicy) wins over ours (pullPolicy) when set. */}}
{{- define "kong-mesh-cni.pullPolicy" -}}
{{- default .Values.cni.image.pullPolicy .Values.cni.image.imagePullPolicy -}}
{{- end }}

{{/* The service accounts' imagePullSecrets (global.imagePullSecrets: names). */}}
{{- define "kong-mesh-cni.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . | quote }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
The plugin's network name. Kuma's injector annotates mesh pods with
k8s.v1.cni.cncf.io/networks: kuma-cni, so under Multus the NetworkAttachmentDefinition
and our configuration's "name" must both be kuma-cni.
*/}}
{{- define "kong-mesh-cni.networkName" -}}
kuma-cni
{{- end }}

{{/*
The plugin's configuration (CNI_NETWORK_CONFIG); the installer replaces
__KUBECONFIG_FILEPATH__ with the host path of the kubeconfig it writes.
*/}}
{{- define "kong-mesh-cni.networkConfig" -}}
{
  "cniVersion": "0.3.1",
  "name": {{ include "kong-mesh-cni.networkName" . | toJson }},
  "type": "kong-mesh-cni",
  "log_level": {{ toJson .Values.cni.logLevel }},
  "log_socket": {{ printf "%s/log.sock" (trimSuffix "/" .Values.cni.runDir) | toJson }},
  "run_dir": {{ trimSuffix "/" .Values.cni.runDir | toJson }},
  "on_api_error": {{ toJson .Values.cni.onApiError }},
  "kubernetes": {
    "kubeconfig": "__KUBECONFIG_FILEPATH__",
    "cni_bin_dir": {{ toJson .Values.cni.binDir }},
    "exclude_namespaces": {{ toJson (default (list) .Values.cni.excludeNamespaces) }}
  }
}
{{- end }}

{{/* Settings that cannot work, refused at render time with a message. */}}
{{- define "kong-mesh-cni.validate" -}}
{{- if and .Values.cni.enabled .Values.experimental.ebpf.enabled (not .Values.cni.containerSecurityContext.privileged) -}}
{{- fail "experimental.ebpf.enabled=true needs cni.containerSecurityContext.privileged=true: the installer loads BPF programs and mounts the node's bpffs and cgroup2 with Bidirectional propagation, which only a privileged container may" -}}
{{- end -}}
{{- if .Values.cni.enabled -}}
{{- with .Values.cni.image.repository -}}
{{- $path := printf "/%s" . -}}
{{- if ne (trimSuffix "/kuma-cni" $path) $path -}}
{{- fail (printf "cni.image.repository=%q is the image of Kuma's Go CNI: this chart runs the kong-mesh-cni image (the Go image does not install the plugin type this chart's configuration names, so every pod on a chained node would fail to start); set cni.image.repository=kong-mesh-cni" .) -}}
{{- end -}}
{{- end -}}
{{- $conf := .Values.cni.confName -}}
{{- if and .Values.cni.chained $conf (eq (trimSuffix ".conf" $conf) $conf) (eq (trimSuffix ".conflist" $conf) $conf) -}}
{{- fail (printf "cni.confName=%q: with cni.chained=true it must name the primary CNI's .conf or .conflist file (or be empty to pick the first one)" $conf) -}}
{{- end -}}
{{- $onApiError := .Values.cni.onApiError -}}
{{- if not (or (eq $onApiError "pass-through") (eq $onApiError "fail")) -}}
{{- fail (printf "cni.onApiError=%q: must be pass-through or fail (the plugin would refuse its configuration and fail every pod)" $onApiError) -}}
{{- end -}}
{{- $level := .Values.cni.logLevel -}}
{{- if not (or (eq $level "off") (eq $level "info") (eq $level "debug") (eq $level "error") (eq $level "warn") (eq $level "trace")) -}}
{{- fail (printf "cni.logLevel=%q: must be off, info or debug (or error, warn, trace)" $level) -}}
{{- end -}}
{{- $action := .Values.cni.controller.repairAction -}}
{{- if not (or (eq $action "delete") (eq $action "label") (eq $action "off")) -}}
{{- fail (printf "cni.controller.repairAction=%q: must be delete, label or off" $action) -}}
{{- end -}}
{{- end -}}
{{- end }}
