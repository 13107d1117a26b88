{{/* The release's full name, cut to 63 characters for DNS. */}}
{{- define "eao.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "eao.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "eao.labels" -}}
{{ include "eao.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: enterprise-agent
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "eao.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "eao.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "eao.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The rules the operator needs on agents and their children; shared by the ClusterRole and the per-namespace Roles. */}}
{{- define "eao.rules" -}}
# EnterpriseAgents: read and watch them, write their status (server-side apply); patch one only
# to answer an undo request (kubectl ea undo, the Argo CD action): the previous revision's fields
# of its spec put back.
- apiGroups: ["agents.enterprise.io"]
  resources: ["enterpriseagents"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["agents.enterprise.io"]
  resources: ["enterpriseagents/status"]
  verbs: ["patch"]
# Every child's ownerReference sets blockOwnerDeletion; with OwnerReferencesPermissionEnforcement
# (OpenShift's default) that needs update on the owner's finalizers.
- apiGroups: ["agents.enterprise.io"]
  resources: ["enterpriseagents/finalizers"]
  verbs: ["update"]
# Children: applied with server-side apply (patch), created, deleted when no longer wanted.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# One ControllerRevision per revision of an agent: how it renders, kept apart from its Deployments.
- apiGroups: ["apps"]
  resources: ["controllerrevisions"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Key Secrets are created once and extended on rotation, never deleted by the operator; get is
# also how it checks that referenced Secrets (imagePullSecrets, users) exist.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Which pods are really behind the preview and active Services, before and after a promotion.
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.rbac.serviceMonitors }}
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- end }}
{{- end -}}
