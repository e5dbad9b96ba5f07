{{/* The image reference: repository, then @digest or :tag (default: appVersion). */}}
{{- define "metaconceal.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* The node's CNI bin dir: cni.binDir, else the preset's. */}}
{{- define "metaconceal.cniBinDir" -}}
{{- if .Values.cni.binDir -}}
{{ .Values.cni.binDir }}
{{- else if eq .Values.preset "gke" -}}
/home/kubernetes/bin
{{- else -}}
/opt/cni/bin
{{- end -}}
{{- end -}}

{{/* The installer's flags shared by the init container and the node agent. */}}
{{- define "metaconceal.installerArgs" -}}
- --cni-bin-dir=/host/opt/cni/bin
- --cni-conf-dir=/host/etc/cni/net.d
- --plugin-binary=/metaconceal/metaconceal
- --mode={{ .Values.mode }}
- --proxy=169.254.169.252:988
{{- if eq .Values.alts "reject" }}
- --alts=reject
{{- end }}
{{- with .Values.excludeNamespaces }}
- --exclude-namespaces={{ join "," . }}
{{- end }}
- --log-format=json
{{- end -}}

{{/* A ServiceMonitor or PodMonitor scrapes the pod IP (the node's): loopback cannot. */}}
{{- define "metaconceal.checkMetricsHost" -}}
{{- if and (or .Values.monitoring.podMonitor.enabled .Values.monitoring.serviceMonitor.enabled) (hasPrefix "127." .Values.metrics.host) -}}
{{- fail (printf "monitoring.podMonitor/serviceMonitor need metrics.host reachable from Prometheus (0.0.0.0), not %q" .Values.metrics.host) -}}
{{- end -}}
{{- end -}}

{{/* KUBERNETES_SERVICE_HOST/PORT when the API server is not reached through the
     kubernetes Service (clusters without kube-proxy). */}}
{{- define "metaconceal.apiServerEnv" -}}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.apiServer.host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.apiServer.port | toString | quote }}
{{- end -}}
