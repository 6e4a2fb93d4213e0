{{/* The components, in start-up order (auth first: the others verify its tokens). */}}
{{- define "plinth.components" -}}
auth config queue audit ai gateway
{{- end }}

{{- define "plinth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-and-chart prefix of every resource name. */}}
{{- define "plinth.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's resources: (dict "root" $ "name" "auth"). */}}
{{- define "plinth.componentName" -}}
{{- printf "%s-%s" (include "plinth.fullname" .root | trunc 56 | trimSuffix "-") .name }}
{{- end }}

{{- define "plinth.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "plinth.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: plinth
{{- end }}

{{- define "plinth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "plinth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: (dict "root" $ "name" "auth"). */}}
{{- define "plinth.componentLabels" -}}
{{ include "plinth.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "plinth.componentSelectorLabels" -}}
{{ include "plinth.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "plinth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "plinth.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "plinth.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* gRPC URL of a component inside the cluster: (dict "root" $ "name" "auth"). */}}
{{- define "plinth.grpcUrl" -}}
{{- printf "http://%s:%v" (include "plinth.componentName" .) .root.Values.ports.grpc }}
{{- end }}

{{/*
A value of `env` as a quoted string. YAML numbers reach templates as floats,
and toString would write 4194304 as "4.194304e+06", which plinthd refuses.
*/}}
{{- define "plinth.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . | toString | quote }}
{{- else }}
{{- toString . | quote }}
{{- end }}
{{- end }}

{{/* Variables the chart sets itself, never from `env`. */}}
{{- define "plinth.managedEnv" -}}
PLINTH_ONLY PLINTH_GRPC_LISTEN PLINTH_HTTP_LISTEN PLINTH_DATABASE_URL PLINTH_NATS_URL PLINTH_REDIS_URL PLINTH_AUTH__BOOTSTRAP_ADMIN_PASSWORD PLINTH_CONFIG__KEYS
{{- end }}

{{/*
The environment of one component: (dict "root" $ "name" "auth").
Every name is a `plinthd --help` variable; secrets come from existing
Secrets. `env` may replace the wiring (PLINTH_AUTH__URL, upstreams), e.g. to
point at a component deployed elsewhere.
*/}}
{{- define "plinth.env" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $c := index $v.components .name }}
{{- $env := merge (deepCopy ($c.env | default dict)) (deepCopy ($v.env | default dict)) }}
{{- range $managed := splitList " " (include "plinth.managedEnv" $root) }}
{{- if hasKey $env $managed }}
{{- fail (printf "env: %s is set by the chart (ports, database, nats, redis, bootstrapAdmin values), not in env" $managed) }}
{{- end }}
{{- end }}
- name: PLINTH_GRPC_LISTEN
  value: {{ printf "0.0.0.0:%v" $v.ports.grpc | quote }}
- name: PLINTH_HTTP_LISTEN
  value: {{ printf "0.0.0.0:%v" $v.ports.http | quote }}
{{- if ne .name "gateway" }}
- name: PLINTH_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.existingSecret: name the Secret holding the PostgreSQL URL" $v.database.existingSecret }}
      key: {{ $v.database.secretKey }}
{{- if $v.nats.enabled }}
- name: PLINTH_NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "nats.existingSecret: name the Secret holding the NATS URL" $v.nats.existingSecret }}
      key: {{ $v.nats.secretKey }}
{{- end }}
{{- end }}
{{- if $v.redis.enabled }}
- name: PLINTH_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.existingSecret: name the Secret holding the Redis URL" $v.redis.existingSecret }}
      key: {{ $v.redis.secretKey }}
{{- end }}
{{- if and (eq .name "auth") $v.bootstrapAdmin.existingSecret }}
- name: PLINTH_AUTH__BOOTSTRAP_ADMIN_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.bootstrapAdmin.existingSecret }}
      key: {{ $v.bootstrapAdmin.secretKey }}
{{- end }}
{{- if and (eq .name "audit") $v.auditSigningKey.existingSecret }}
- name: PLINTH_AUDIT__SIGNING_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $v.auditSigningKey.existingSecret }}
      key: {{ $v.auditSigningKey.secretKey }}
{{- end }}
{{- if and (eq .name "auth") $v.authKeys.existingSecret }}
- name: PLINTH_AUTH__KEYS
  valueFrom:
    secretKeyRef:
      name: {{ $v.authKeys.existingSecret }}
      key: {{ $v.authKeys.secretKey }}
{{- end }}
{{- if and (eq .name "ai") $v.aiSecretsApiKey.existingSecret }}
- name: PLINTH_AI__SECRETS_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $v.aiSecretsApiKey.existingSecret }}
      key: {{ $v.aiSecretsApiKey.secretKey }}
{{- end }}
{{- if and (eq .name "ai") $v.components.config.enabled (not (hasKey $env "PLINTH_AI__SECRETS_URL")) }}
- name: PLINTH_AI__SECRETS_URL
  value: {{ include "plinth.grpcUrl" (dict "root" $root "name" "config") | quote }}
{{- end }}
{{- if and (eq .name "config") $v.configKeys.existingSecret }}
- name: PLINTH_CONFIG__KEYS
  valueFrom:
    secretKeyRef:
      name: {{ $v.configKeys.existingSecret }}
      key: {{ $v.configKeys.secretKey }}
{{- end }}
{{- if and (ne .name "auth") $v.components.auth.enabled (not (hasKey $env "PLINTH_AUTH__URL")) }}
- name: PLINTH_AUTH__URL
  value: {{ include "plinth.grpcUrl" (dict "root" $root "name" "auth") | quote }}
{{- end }}
{{- if eq .name "gateway" }}
{{- range $upstream := splitList " " (include "plinth.components" $root) }}
{{- $var := printf "PLINTH_GATEWAY__UPSTREAMS__%s" (upper $upstream) }}
{{- if and (ne $upstream "gateway") (index $v.components $upstream).enabled (not (hasKey $env $var)) }}
- name: {{ $var }}
  value: {{ include "plinth.grpcUrl" (dict "root" $root "name" $upstream) | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $value := $env }}
- name: {{ $name }}
  value: {{ include "plinth.envValue" $value }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with $c.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
