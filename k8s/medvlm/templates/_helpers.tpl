{{/* Names, labels and shared snippets of the medvlm chart. */}}

{{- define "medvlm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "medvlm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "medvlm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "medvlm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "medvlm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "medvlm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: medvlm-pipeline
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Component selector labels: (dict "root" $ "component" "ray") */}}
{{- define "medvlm.componentSelector" -}}
{{ include "medvlm.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "medvlm.rayServiceAccount" -}}
{{- if .Values.ray.serviceAccount.create }}
{{- default (printf "%s-ray" (include "medvlm.fullname" .)) .Values.ray.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.ray.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "medvlm.workerServiceAccount" -}}
{{- if .Values.prefectWorker.serviceAccount.create }}
{{- default (printf "%s-prefect-worker" (include "medvlm.fullname" .)) .Values.prefectWorker.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.prefectWorker.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "medvlm.postgresqlName" -}}
{{- printf "%s-postgresql" (include "medvlm.fullname" .) }}
{{- end }}

{{/* KubeRay names the Serve Service of a RayService `<name>-serve-svc` and front-truncates names
     over 50 characters: fullname is capped at 40 so that this name stays exact. */}}
{{- define "medvlm.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "medvlm.fullname" .) }}
{{- end }}

{{/* An env entry read from an existing Secret: (dict "name" ENV "secret" .Values.x.ySecret) */}}
{{- define "medvlm.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret.name | quote }}
      key: {{ .secret.key | quote }}
{{- end }}

{{/* imagePullSecrets of a pod spec (nothing when none is set). */}}
{{- define "medvlm.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* runtimeClassName and priorityClassName of a pod spec, each only when set:
     (dict "runtimeClassName" x "priorityClassName" y) */}}
{{- define "medvlm.podClasses" -}}
{{- with .runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* The job ledger's env (PostgreSQL): one definition for the Prefect worker, the setup hook
     Job and the helm test pod. The password is set into the URL by the app (SQLAlchemy escapes
     it): never pasted into the URL here. */}}
{{- define "medvlm.ledgerEnv" -}}
{{- if .Values.database.internal.enabled -}}
{{ include "medvlm.secretEnv" (dict "name" "MEDVLM_JOB__LEDGER_PASSWORD" "secret" .Values.database.internal.passwordSecret) }}
- name: MEDVLM_JOB__LEDGER_URL
  value: {{ printf "%s://%s@%s:5432/%s" .Values.database.internal.urlScheme .Values.database.internal.user (include "medvlm.postgresqlName" .) .Values.database.internal.database | quote }}
{{- else -}}
{{ include "medvlm.secretEnv" (dict "name" "MEDVLM_JOB__LEDGER_URL" "secret" .Values.database.external.urlSecret) }}
{{- end }}
{{- end }}

{{/* The Prefect API the worker and the setup Job talk to. */}}
{{- define "medvlm.prefectApiEnv" -}}
{{- $pw := .Values.prefectWorker -}}
- name: PREFECT_API_URL
  value: {{ $pw.apiUrl | quote }}
{{- if $pw.apiAuthSecret.name }}
{{ include "medvlm.secretEnv" (dict "name" "PREFECT_API_AUTH_STRING" "secret" $pw.apiAuthSecret) }}
{{- end }}
- name: PREFECT_HOME
  value: /tmp/prefect
{{- end }}

{{/* The model service as its callers see it (the Prefect worker, the helm test pod): KubeRay's
     Serve Service of the RayService, cluster-internal. */}}
{{- define "medvlm.modelServiceEnv" -}}
- name: MEDVLM_JOB__MODEL_ENDPOINT
  value: "http"
- name: MEDVLM_JOB__MODEL_URL
  value: {{ printf "http://%s:%v%s" (include "medvlm.serveServiceName" .) .Values.serve.port (trimSuffix "/" .Values.serve.routePrefix) | quote }}
- name: MEDVLM_MODEL__SERVED_NAME
  value: {{ .Values.model.servedName | quote }}
{{- if .Values.serve.apiKeySecret.name }}
{{ include "medvlm.secretEnv" (dict "name" "MEDVLM_SERVING__API_KEY" "secret" .Values.serve.apiKeySecret) }}
{{- end }}
{{- end }}

{{/* NetworkPolicy egress rules to the job ledger's database. */}}
{{- define "medvlm.ledgerEgress" -}}
{{- if .Values.database.internal.enabled }}
- to:
    - podSelector:
        matchLabels:
          {{- include "medvlm.componentSelector" (dict "root" . "component" "postgresql") | nindent 10 }}
  ports:
    - protocol: TCP
      port: 5432
{{- else }}
{{- range .Values.database.external.cidrs }}
- to:
    - ipBlock:
        cidr: {{ . }}
  ports:
    - protocol: TCP
      port: {{ $.Values.database.external.port }}
{{- end }}
{{- end }}
{{- end }}

{{/* NetworkPolicy egress rules from a values list of `{cidr, ports}` or
     `{namespaceSelector, podSelector, ports}`. */}}
{{- define "medvlm.egressRules" -}}
{{- range . }}
- to:
    {{- if .cidr }}
    - ipBlock:
        cidr: {{ .cidr }}
    {{- else }}
    - namespaceSelector:
        matchLabels:
          {{- toYaml .namespaceSelector | nindent 10 }}
      {{- with .podSelector }}
      podSelector:
        matchLabels:
          {{- toYaml . | nindent 10 }}
      {{- end }}
    {{- end }}
  ports:
    {{- range .ports }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
{{- end }}
{{- end }}

{{/* Whether the worker receives C-MOVE sub-operations: its storage SCP listens for C-STORE. */}}
{{- define "medvlm.storageScp" -}}
{{- if and .Values.prefectWorker.enabled (eq .Values.pacs.kind "dimse") (eq .Values.pacs.dimseRetrieve "move") }}true{{ end }}
{{- end }}

{{/* The model version every draft and ledger row records (MEDVLM_MODEL__VERSION): required, and
     the one value both the Ray pods and the Prefect worker get. */}}
{{- define "medvlm.modelVersion" -}}
{{- required "model.version is required: the version label recorded with every draft and ledger row (MEDVLM_MODEL__VERSION), given to the Ray pods and the Prefect worker, e.g. --set model.version=med-r1-2025.06; without it the worker refuses every run" .Values.model.version | toString }}
{{- end }}

{{/* GPUs one replica asks Ray for (`num_gpus`, MEDVLM_SERVING__NUM_GPUS): vLLM shards the model
     over model.tensorParallelSize GPUs, so as many on a GPU group; 0 on a CPU group. */}}
{{- define "medvlm.gpusPerReplica" -}}
{{- if gt (int .Values.ray.gpuWorkers.gpus) 0 }}
{{- int .Values.model.tensorParallelSize }}
{{- else }}
{{- 0 }}
{{- end }}
{{- end }}

{{/* A PodDisruptionBudget's bound: "" (unset) or a number or percentage. */}}
{{- define "medvlm.pdbBound" -}}
{{- if and (not (kindIs "invalid" .)) (ne (toString .) "") }}{{ . }}{{ end }}
{{- end }}

{{/* Render-time checks of values the schema of a Kubernetes object cannot express. */}}
{{- define "medvlm.validate" -}}
{{- $ray := .Values.ray }}
{{- $tag := toString $ray.image.tag }}
{{- if not (or (eq $tag $ray.version) (hasPrefix (printf "%s-" $ray.version) $tag)) }}
{{- fail (printf "ray.image.tag %q must be ray.version %q or start with %q" $tag $ray.version (printf "%s-" $ray.version)) }}
{{- end }}
{{- $gpr := int (include "medvlm.gpusPerReplica" .) }}
{{- $podGpus := int $ray.gpuWorkers.gpus }}
{{- if gt $gpr $podGpus }}
{{- fail (printf "model.tensorParallelSize (%d) GPUs per replica exceeds the GPUs of one worker pod, ray.gpuWorkers.gpus (%d): a replica's tensor-parallel GPUs must be in one pod" $gpr $podGpus) }}
{{- end }}
{{- $a := .Values.serve.autoscaling }}
{{- if not (has (toString $ray.upgradeStrategy.type) (list "None" "NewCluster")) }}
{{- fail (printf "ray.upgradeStrategy.type must be None or NewCluster, not %q" (toString $ray.upgradeStrategy.type)) }}
{{- end }}
{{- range $key, $pdb := dict "prefectWorker" .Values.prefectWorker.podDisruptionBudget "ray.gpuWorkers" $ray.gpuWorkers.podDisruptionBudget }}
{{- if $pdb.enabled }}
{{- $min := include "medvlm.pdbBound" $pdb.minAvailable }}
{{- $max := include "medvlm.pdbBound" $pdb.maxUnavailable }}
{{- if and $min $max }}
{{- fail (printf "%s.podDisruptionBudget: set minAvailable or maxUnavailable, not both" $key) }}
{{- end }}
{{- if not (or $min $max) }}
{{- fail (printf "%s.podDisruptionBudget.enabled: set minAvailable or maxUnavailable" $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- if $a.enabled }}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) }}
{{- fail (printf "serve.autoscaling.minReplicas (%v) exceeds serve.autoscaling.maxReplicas (%v)" $a.minReplicas $a.maxReplicas) }}
{{- end }}
{{- if gt (float64 $a.targetOngoingRequests) (float64 .Values.serve.maxOngoingRequests) }}
{{- fail (printf "serve.autoscaling.targetOngoingRequests (%v) exceeds serve.maxOngoingRequests (%v)" $a.targetOngoingRequests .Values.serve.maxOngoingRequests) }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.kubernetesApiEgress) }}
{{- fail "serve.autoscaling.enabled runs KubeRay's autoscaler in the head pod, which calls the Kubernetes API: set networkPolicy.kubernetesApiEgress" }}
{{- end }}
{{- end }}
{{- if gt $gpr 0 }}
{{- /* Every replica must fit in the group: the fixed replicas in its pods, or with autoscaling
       serve.autoscaling.maxReplicas in ray.gpuWorkers.maxReplicas pods. */}}
{{- $replicas := ternary (int $a.maxReplicas) (int .Values.serve.numReplicas) (eq $a.enabled true) }}
{{- $replicasKey := ternary "serve.autoscaling.maxReplicas" "serve.numReplicas" (eq $a.enabled true) }}
{{- $pods := ternary (int $ray.gpuWorkers.maxReplicas) (int $ray.gpuWorkers.replicas) (eq $a.enabled true) }}
{{- $podsKey := ternary "ray.gpuWorkers.maxReplicas" "ray.gpuWorkers.replicas" (eq $a.enabled true) }}
{{- if gt (mul $replicas $gpr) (mul $pods $podGpus) }}
{{- fail (printf "%s (%d) replicas x model.tensorParallelSize (%d) need %d GPUs, more than the GPU worker group has: %s (%d) pods x ray.gpuWorkers.gpus (%d) = %d GPUs" $replicasKey $replicas $gpr (mul $replicas $gpr) $podsKey $pods $podGpus (mul $pods $podGpus)) }}
{{- end }}
{{- $perPod := div $podGpus $gpr }}
{{- $perNode := int .Values.serve.maxReplicasPerNode }}
{{- if and (gt $perNode 0) (lt $perNode $perPod) }}
{{- $perPod = $perNode }}
{{- end }}
{{- if gt $replicas (mul $pods $perPod) }}
{{- fail (printf "%s (%d) replicas do not fit in the GPU worker group: one pod holds %d replicas of model.tensorParallelSize (%d) GPUs (ray.gpuWorkers.gpus %d, serve.maxReplicasPerNode %d), so %s (%d) pods hold %d" $replicasKey $replicas $perPod $gpr $podGpus $perNode $podsKey $pods (mul $pods $perPod)) }}
{{- end }}
{{- end }}
{{- if not (has .Values.model.weights.source (list "pvc" "hostPath" "hub")) }}
{{- fail (printf "model.weights.source must be pvc, hostPath or hub, not %q" .Values.model.weights.source) }}
{{- end }}
{{- if and (eq .Values.model.weights.source "hub") (not .Values.model.weights.hubId) }}
{{- fail "model.weights.source hub needs model.weights.hubId" }}
{{- end }}
{{- if and .Values.database.internal.enabled (not .Values.database.internal.passwordSecret.name) }}
{{- fail "database.internal.passwordSecret.name must name an existing Secret" }}
{{- end }}
{{- if and (not .Values.database.internal.enabled) .Values.prefectWorker.enabled (not .Values.database.external.urlSecret.name) }}
{{- fail "database.internal.enabled is false: set database.external.urlSecret.name" }}
{{- end }}
{{- $gcs := $ray.gcsFaultTolerance }}
{{- if $gcs.enabled }}
{{- if not $gcs.redisAddress }}
{{- fail "ray.gcsFaultTolerance.enabled needs ray.gcsFaultTolerance.redisAddress (host:port of the external Redis)" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.redisEgress) }}
{{- fail "ray.gcsFaultTolerance.enabled: the Ray head writes the GCS state to Redis, set networkPolicy.redisEgress" }}
{{- end }}
{{- end }}
{{- if include "medvlm.storageScp" . }}
{{- if gt (int .Values.prefectWorker.replicas) 1 }}
{{- fail (printf "pacs.dimseRetrieve move: the PACS sends each C-MOVE's instances to one address (the storage SCP Service), which would spread them over the %d worker pods, not only to the one that asked; set prefectWorker.replicas to 1" (int .Values.prefectWorker.replicas)) }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.pacsScpIngress) }}
{{- fail "pacs.dimseRetrieve move: the PACS opens C-STORE associations to the worker's storage SCP, set networkPolicy.pacsScpIngress (the PACS CIDRs)" }}
{{- end }}
{{- end }}
{{- $prov := .Values.model.weights.provision }}
{{- if $prov.enabled }}
{{- if ne .Values.model.weights.source "pvc" }}
{{- fail (printf "model.weights.provision copies the checkpoint into the weights PVC: it needs model.weights.source pvc, not %q" .Values.model.weights.source) }}
{{- end }}
{{- if not (trimAll "/" (toString .Values.model.weights.subPath)) }}
{{- fail "model.weights.provision needs model.weights.subPath: the checkpoint directory it fills (never the volume's root)" }}
{{- end }}
{{- if not $prov.volume }}
{{- fail "model.weights.provision.volume must name the volume holding the checkpoint to copy (e.g. persistentVolumeClaim: {claimName: ...})" }}
{{- end }}
{{- if eq (empty $prov.manifest) (empty $prov.manifestFile) }}
{{- fail "model.weights.provision: set exactly one of manifest (path: sha256) and manifestFile (a sha256sum file in the source)" }}
{{- end }}
{{- end }}
{{- end }}

{{/* How many replicas: a fixed number, or Serve's autoscaling bounds (the settings refuse both). */}}
{{- define "medvlm.replicasEnv" -}}
{{- $a := .Values.serve.autoscaling -}}
{{- if $a.enabled -}}
- name: MEDVLM_SERVING__MIN_REPLICAS
  value: {{ $a.minReplicas | quote }}
- name: MEDVLM_SERVING__MAX_REPLICAS
  value: {{ $a.maxReplicas | quote }}
- name: MEDVLM_SERVING__TARGET_ONGOING_REQUESTS
  value: {{ $a.targetOngoingRequests | quote }}
- name: MEDVLM_SERVING__UPSCALE_DELAY_S
  value: {{ $a.upscaleDelayS | quote }}
- name: MEDVLM_SERVING__DOWNSCALE_DELAY_S
  value: {{ $a.downscaleDelayS | quote }}
- name: MEDVLM_SERVING__LOOK_BACK_PERIOD_S
  value: {{ $a.lookBackPeriodS | quote }}
{{- else -}}
- name: MEDVLM_SERVING__NUM_REPLICAS
  value: {{ .Values.serve.numReplicas | quote }}
{{- end }}
{{- with .Values.serve.maxReplicasPerNode }}
- name: MEDVLM_SERVING__MAX_REPLICAS_PER_NODE
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* MEDVLM_* env of the Ray containers (head and workers): the settings cluster_app reads. */}}
{{- define "medvlm.rayEnv" -}}
{{- $w := .Values.model.weights -}}
- name: MEDVLM_HOME
  value: /tmp/medvlm
- name: HOME
  value: /tmp/home
- name: XDG_CACHE_HOME
  value: /tmp/cache
{{- if eq $w.source "hub" }}
- name: MEDVLM_MODEL__SOURCE
  value: {{ $w.hubId | quote }}
{{- if $w.hubTokenSecret.name }}
{{ include "medvlm.secretEnv" (dict "name" "HF_TOKEN" "secret" $w.hubTokenSecret) }}
{{- end }}
{{- else }}
- name: MEDVLM_MODEL__SOURCE
  value: {{ printf "%s/%s" (trimSuffix "/" $w.mountPath) $w.subPath | trimSuffix "/" | quote }}
# Weights come from a mounted volume: nothing may be fetched from a model hub.
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- end }}
- name: MEDVLM_MODEL__SERVED_NAME
  value: {{ .Values.model.servedName | quote }}
- name: MEDVLM_MODEL__VERSION
  value: {{ include "medvlm.modelVersion" . | quote }}
- name: MEDVLM_MODEL__MAX_MODEL_LEN
  value: {{ .Values.model.maxModelLen | quote }}
- name: MEDVLM_MODEL__TENSOR_PARALLEL_SIZE
  value: {{ .Values.model.tensorParallelSize | quote }}
- name: MEDVLM_MODEL__MAX_NUM_SEQS
  value: {{ .Values.model.maxNumSeqs | quote }}
{{- with .Values.model.kvCacheBytes }}
- name: MEDVLM_MODEL__KV_CACHE_BYTES
  value: {{ . | quote }}
{{- end }}
- name: MEDVLM_SERVING__APP_NAME
  value: {{ .Values.serve.appName | quote }}
{{ include "medvlm.replicasEnv" . }}
- name: MEDVLM_SERVING__NUM_GPUS
  value: {{ include "medvlm.gpusPerReplica" . | quote }}
- name: MEDVLM_SERVING__NUM_CPUS
  value: {{ .Values.serve.numCpusPerReplica | quote }}
- name: MEDVLM_SERVING__MAX_ONGOING_REQUESTS
  value: {{ .Values.serve.maxOngoingRequests | quote }}
- name: MEDVLM_SERVING__ROUTE_PREFIX
  value: {{ .Values.serve.routePrefix | quote }}
{{- if .Values.serve.apiKeySecret.name }}
{{ include "medvlm.secretEnv" (dict "name" "MEDVLM_SERVING__API_KEY" "secret" .Values.serve.apiKeySecret) }}
{{- end }}
{{- end }}

{{/* Volumes every Ray container writes to: /tmp (Ray session dir, caches) and /dev/shm. */}}
{{- define "medvlm.rayScratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.ray.tmpSizeLimit }}
{{- end }}
