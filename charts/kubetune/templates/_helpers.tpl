{{/* Chart name, cut to the 63 characters a label value allows. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, unless it already contains the chart name. */}}
{{- define "kubetune.fullname" -}}
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

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object: app.kubernetes.io/* as the Kubernetes recommended labels. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* Labels that select the operator's pods; they never change after install. */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest} and the registry: a digest wins over a tag, and
an empty tag means the chart's appVersion. Call with (dict "image" .Values.image "root" $).
*/}}
{{- define "kubetune.image" -}}
{{- $repository := .image.repository }}
{{- with .root.Values.imageRegistry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repository .image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
The operator's rules inside a namespace it watches: exactly what kubetune.operator.handlers and
kopf use (docs/install.md lists each call). The same list goes into the ClusterRole (all
namespaces) or into one Role per watched namespace.
*/}}
{{- define "kubetune.namespacedRules" -}}
# The operator watches FineTuneJobs (its in-memory index), deletes one after
# ttlSecondsAfterFinished, and removes the finalizer an older kubetune version left (patch).
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch, delete]
# Phase, conditions, result, and the progress the trainers report to the operator (a trainer
# has no API identity of its own).
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status]
  verbs: [get, patch]
# Children set blockOwnerDeletion on their ownerReference to the FineTuneJob; where the
# OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift), that takes update on
# finalizers. It adds nothing real: patch on finetunejobs can edit finalizers anyway.
- apiGroups: [kubetune.io]
  resources: [finetunejobs/finalizers]
  verbs: [update]
# One Event per phase change.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Children of each FineTuneJob, created once (create; get when it exists already): the resolved
# trainer config, the trainer's NetworkPolicy, a multi-pod group's headless Service, and the
# Job. No ServiceAccount, Role or RoleBinding: the trainer runs as its namespace's
# trainer.serviceAccountName with no API token. A companion found in place already (made first
# by someone else, with the job's uid as its owner) gets the rendered content written over it
# (update). Deleted only when the API refused a later child of the same job (nothing half-made
# stays).
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, create, update, delete]
# The trainers' NetworkPolicies are also watched (list, watch): one deleted or changed by
# someone with edit rights is put back while a job there is unfinished.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, update, delete]
# The Job is also watched for status, and patched to suspend/resume it or change its deadline.
# A multi-pod group's failed Job is deleted to start the group's next attempt as a new Job.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# Kueue's Workload of a queued job's Job: runPolicy.suspend deactivates it (Kueue's way to stop
# an admitted Job; it would unsuspend a Job suspended directly) and resuming activates it again.
# Harmless where Kueue is not installed (nothing is read unless a job names a queue).
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, patch]
{{- if eq .Values.operator.groupWorkload "jobset" }}
# A multi-pod group's JobSet (operator.groupWorkload: jobset): created once (get when it exists
# already), watched for status, patched to suspend/resume it. Never deleted by the operator:
# JobSet restarts the group, and the garbage collector removes it with its FineTuneJob.
- apiGroups: [jobset.x-k8s.io]
  resources: [jobsets]
  verbs: [get, list, watch, create, patch]
{{- end }}
# Pods of the Job: scheduling failures, exit codes, termination messages.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# Referenced claims are checked for existence. Secrets are never read: a missing Secret or key
# shows on the trainer pod (CreateContainerConfigError), which the operator reports.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
{{- end }}

{{/* The operator's settings (kubetune.operator.settings.OperatorSettings) as KUBETUNE_* env. */}}
{{- define "kubetune.operatorEnv" -}}
- name: KUBETUNE_NAMESPACES
  value: {{ join "," .Values.watchNamespaces | quote }}
- name: KUBETUNE_MAX_WORKERS
  value: {{ .Values.operator.maxWorkers | quote }}
- name: KUBETUNE_DENIED_OPTIONS
  value: {{ join "," .Values.operator.deniedOptions | quote }}
- name: KUBETUNE_PROGRESS_INTERVAL_SECONDS
  value: {{ .Values.operator.progressIntervalSeconds | quote }}
- name: KUBETUNE_WATCH_TIMEOUT_SECONDS
  value: {{ .Values.operator.watchTimeoutSeconds | quote }}
- name: KUBETUNE_WATCH_INACTIVITY_SECONDS
  value: {{ .Values.operator.watchInactivitySeconds | quote }}
- name: KUBETUNE_API_TIMEOUT_SECONDS
  value: {{ .Values.operator.apiTimeoutSeconds | quote }}
- name: KUBETUNE_STATUS_RECHECK_SECONDS
  value: {{ .Values.operator.statusRecheckSeconds | quote }}
- name: KUBETUNE_REFERENCE_RECHECK_SECONDS
  value: {{ .Values.operator.referenceRecheckSeconds | quote }}
- name: KUBETUNE_LIVENESS_ENDPOINT
  value: {{ printf "http://0.0.0.0:%d/healthz" (int .Values.operator.healthPort) | quote }}
- name: KUBETUNE_METRICS_PORT
  value: {{ .Values.operator.metricsPort | quote }}
- name: KUBETUNE_LEADER_ELECTION
  value: {{ .Values.operator.leaderElection.enabled | quote }}
- name: KUBETUNE_LEASE_NAME
  value: {{ include "kubetune.fullname" . | quote }}
- name: KUBETUNE_LEASE_NAMESPACE
  value: {{ .Release.Namespace | quote }}
- name: KUBETUNE_LEASE_DURATION_SECONDS
  value: {{ .Values.operator.leaderElection.leaseDurationSeconds | quote }}
- name: KUBETUNE_LEASE_RENEW_SECONDS
  value: {{ .Values.operator.leaderElection.renewSeconds | quote }}
- name: KUBETUNE_GROUP_WORKLOAD
  value: {{ .Values.operator.groupWorkload | quote }}
- name: KUBETUNE_JSON_LOGS
  value: {{ .Values.operator.jsonLogs | quote }}
- name: KUBETUNE_VERBOSE
  value: {{ .Values.operator.verbose | quote }}
- name: KUBETUNE_TRAINER_IMAGE
  value: {{ include "kubetune.image" (dict "image" .Values.trainer.image "root" $) | quote }}
- name: KUBETUNE_IMAGE_PULL_POLICY
  value: {{ .Values.trainer.image.pullPolicy | quote }}
- name: KUBETUNE_RUN_AS_NON_ROOT
  value: {{ .Values.trainer.runAsNonRoot | quote }}
- name: KUBETUNE_RUN_AS_USER
  value: {{ include "kubetune.optionalInt" .Values.trainer.runAsUser }}
- name: KUBETUNE_FS_GROUP
  value: {{ include "kubetune.optionalInt" .Values.trainer.fsGroup }}
- name: KUBETUNE_CONFIG_MOUNT_PATH
  value: {{ .Values.trainer.configMountPath | quote }}
- name: KUBETUNE_PVC_ROOT
  value: {{ .Values.trainer.pvcRoot | quote }}
- name: KUBETUNE_ALLOWED_IMAGES
  value: {{ join "," .Values.trainer.allowedImages | quote }}
- name: KUBETUNE_ALLOWED_POD_TEMPLATE_FIELDS
  value: {{ join "," .Values.trainer.allowedPodTemplateFields | quote }}
- name: KUBETUNE_ALLOWED_POD_TEMPLATE_ENV
  value: {{ join "," .Values.trainer.allowedPodTemplateEnv | quote }}
- name: KUBETUNE_ALLOWED_HUB_ENDPOINTS
  value: {{ join "," .Values.trainer.allowedHubEndpoints | quote }}
- name: KUBETUNE_ALLOWED_OBJECT_STORE_ENDPOINTS
  value: {{ join "," .Values.trainer.allowedObjectStoreEndpoints | quote }}
- name: KUBETUNE_ALLOWED_REGISTRIES
  value: {{ join "," .Values.trainer.allowedRegistries | quote }}
- name: KUBETUNE_PLAIN_HTTP_REGISTRIES
  value: {{ join "," .Values.trainer.plainHttpRegistries | quote }}
- name: KUBETUNE_ALLOWED_TRACKING_HOSTS
  value: {{ join "," .Values.trainer.tracking.allowedHosts | quote }}
- name: KUBETUNE_TRACKING_HTTP_CREDENTIALS_HOSTS
  value: {{ join "," .Values.trainer.tracking.httpCredentialsHosts | quote }}
- name: KUBETUNE_TRAINER_NETWORK_POLICY
  value: {{ .Values.trainer.networkPolicy.enabled | quote }}
- name: KUBETUNE_TRAINER_EGRESS_CIDRS
  value: {{ join "," .Values.trainer.networkPolicy.egressCIDRs | quote }}
- name: KUBETUNE_TRAINER_EGRESS_EXCEPT
  value: {{ join "," .Values.trainer.networkPolicy.egressExcept | quote }}
- name: KUBETUNE_VALIDATION_CPU_REQUEST
  value: {{ .Values.trainer.validation.resources.requests.cpu | quote }}
- name: KUBETUNE_VALIDATION_CPU_LIMIT
  value: {{ .Values.trainer.validation.resources.limits.cpu | quote }}
- name: KUBETUNE_VALIDATION_MEMORY_REQUEST
  value: {{ .Values.trainer.validation.resources.requests.memory | quote }}
- name: KUBETUNE_VALIDATION_MEMORY_LIMIT
  value: {{ .Values.trainer.validation.resources.limits.memory | quote }}
- name: KUBETUNE_VALIDATION_EPHEMERAL_STORAGE_REQUEST
  value: {{ index .Values.trainer.validation.resources.requests "ephemeral-storage" | quote }}
- name: KUBETUNE_VALIDATION_EPHEMERAL_STORAGE_LIMIT
  value: {{ index .Values.trainer.validation.resources.limits "ephemeral-storage" | quote }}
- name: KUBETUNE_VALIDATION_ACTIVE_DEADLINE_SECONDS
  value: {{ .Values.trainer.validation.activeDeadlineSeconds | quote }}
- name: KUBETUNE_METRICS_AUTH
  value: {{ .Values.metrics.auth | quote }}
- name: KUBETUNE_TRAINER_CLUSTER_CIDRS
  value: {{ join "," .Values.trainer.networkPolicy.clusterCIDRs | quote }}
- name: KUBETUNE_TRAINER_DNS_NAMESPACE_SELECTOR
  value: {{ toJson .Values.trainer.networkPolicy.dns.namespaceSelector | quote }}
- name: KUBETUNE_TRAINER_DNS_POD_SELECTOR
  value: {{ toJson .Values.trainer.networkPolicy.dns.podSelector | quote }}
- name: KUBETUNE_TRAINER_DNS_CIDRS
  value: {{ join "," .Values.trainer.networkPolicy.dns.cidrs | quote }}
- name: KUBETUNE_TRAINER_APISERVER_CIDRS
  value: {{ join "," .Values.trainer.networkPolicy.apiServer.cidrs | quote }}
- name: KUBETUNE_TRAINER_APISERVER_PORTS
  value: {{ join "," .Values.trainer.networkPolicy.apiServer.ports | quote }}
- name: KUBETUNE_TRAINER_DOWNLOAD_ALLOWED_CIDRS
  value: {{ join "," .Values.trainer.downloadAllowedCIDRs | quote }}
- name: KUBETUNE_TRAINER_SERVICE_ACCOUNT
  value: {{ .Values.trainer.serviceAccountName | quote }}
{{- if .Values.progress.enabled }}
- name: KUBETUNE_PROGRESS_PORT
  value: {{ .Values.progress.port | quote }}
- name: KUBETUNE_PROGRESS_URL
  value: {{ .Values.progress.url | default (printf "https://%s.%s.svc:%d/v1/progress" (include "kubetune.progressService" .) .Release.Namespace (int .Values.progress.port)) | quote }}
- name: KUBETUNE_PROGRESS_AUDIENCE
  value: {{ .Values.progress.audience | quote }}
- name: KUBETUNE_PROGRESS_TLS_CERT_FILE
  value: /etc/kubetune/progress-tls/tls.crt
- name: KUBETUNE_PROGRESS_TLS_KEY_FILE
  value: /etc/kubetune/progress-tls/tls.key
# The CA each trainer's config carries: the one certificate it trusts for the progress URL.
- name: KUBETUNE_PROGRESS_CA_BUNDLE
  valueFrom:
    secretKeyRef:
      name: {{ include "kubetune.progressTLSSecret" . }}
      key: ca.crt
- name: KUBETUNE_PROGRESS_PEER_NAMESPACE_SELECTOR
  value: {{ dict "kubernetes.io/metadata.name" .Release.Namespace | toJson | quote }}
- name: KUBETUNE_PROGRESS_PEER_POD_SELECTOR
  value: {{ include "kubetune.selectorLabels" . | fromYaml | toJson | quote }}
{{- else }}
- name: KUBETUNE_PROGRESS_PORT
  value: ""
{{- end }}
{{- end }}

{{- define "kubetune.progressService" -}}
{{ include "kubetune.fullname" . }}-progress
{{- end }}

{{- define "kubetune.progressTLSSecret" -}}
{{ .Values.progress.tls.secretName | default (printf "%s-progress-tls" (include "kubetune.fullname" .)) }}
{{- end }}

{{/* A quoted integer, or "" for null (the operator then leaves the field unset). */}}
{{- define "kubetune.optionalInt" -}}
{{- if kindIs "invalid" . }}""{{ else }}{{ int64 . | toString | quote }}{{ end }}
{{- end }}
