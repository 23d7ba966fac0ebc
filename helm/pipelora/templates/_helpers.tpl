{{/* Chart name, for label values. */}}
{{- define "pipelora.name" -}}
{{- .Chart.Name -}}
{{- end -}}

{{/*
Object names are the job spec's `name` (the release name), as pipelora.workflow.names computes them
for `status`, `logs` and MASTER_ADDR: <name>, <name>-spec, <name>-dataprep, <name>-worker-<i>.
A release installed under another name would break that agreement, so it is refused.
*/}}
{{- define "pipelora.fullname" -}}
{{- $spec := fromYaml (required "jobSpec is empty: render the chart with `pipelora-k8s render` or `submit`" .Values.jobSpec) -}}
{{- if ne (get $spec "name") .Release.Name -}}
{{- fail (printf "the release is named %q but the job spec's name is %q; install it as %q (pipelora-k8s submit does)" .Release.Name (get $spec "name") (get $spec "name")) -}}
{{- end -}}
{{- .Release.Name -}}
{{- end -}}

{{- define "pipelora.serviceAccountName" -}}
{{- default (include "pipelora.fullname" .) .Values.serviceAccountName -}}
{{- end -}}

{{/* An argv list from values, refusing an empty one (the chart carries no default commands). */}}
{{- define "pipelora.command" -}}
{{- $argv := index .root.Values.commands .key -}}
{{- if not $argv -}}
{{- fail (printf "commands.%s is empty: render the chart with `pipelora-k8s render` or `submit`" .key) -}}
{{- end -}}
{{- toYaml $argv -}}
{{- end -}}

{{- define "pipelora.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pipelora.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pipelora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pipelora.labels" -}}
helm.sh/chart: {{ include "pipelora.chart" . }}
{{ include "pipelora.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pipelora
{{- end -}}

{{/* Labels of a pod; `component` is dataprep, launcher or worker. */}}
{{- define "pipelora.podLabels" -}}
{{ include "pipelora.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .root.Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "pipelora.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "pipelora.configMapName" -}}
{{- printf "%s-spec" (include "pipelora.fullname" .) -}}
{{- end -}}

{{/* Environment of every container: credentials only through secretKeyRef, then extra env. */}}
{{- define "pipelora.env" -}}
{{- with .Values.secrets.s3.name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.secrets.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.secrets.s3.secretAccessKeyKey }}
{{- end }}
{{- with .Values.secrets.hfToken.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.secrets.hfToken.key }}
{{- end }}
- name: PYTHONUNBUFFERED
  value: "1"
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "pipelora.envFrom" -}}
{{- range .Values.secrets.envFrom }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by the dataprep, launcher and worker pods. */}}
{{- define "pipelora.podCommon" -}}
serviceAccountName: {{ include "pipelora.serviceAccountName" . }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.schedulerName }}
schedulerName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
{{ toYaml . | indent 2 }}
{{- end }}
securityContext:
{{ toYaml .Values.podSecurityContext | indent 2 }}
{{- end -}}

{{- define "pipelora.specVolume" -}}
- name: job-spec
  configMap:
    name: {{ include "pipelora.configMapName" . }}
{{- end -}}

{{- define "pipelora.specMount" -}}
- name: job-spec
  mountPath: /etc/pipelora
  readOnly: true
{{- end -}}

{{/* Comma-separated names handed to the ranks: the chart's extra env and worker.podEnvNames. */}}
{{- define "pipelora.podEnvNames" -}}
{{- $names := list -}}
{{- range .Values.env }}{{- $names = append $names .name -}}{{- end -}}
{{- range .Values.worker.podEnvNames }}{{- $names = append $names . -}}{{- end -}}
{{- join "," $names -}}
{{- end -}}
