#!/usr/bin/env bash
# `make demo`: a newcomer's first run, on this machine, in one command.
#
# Starts the local cluster (a real control plane built from Go modules, and a node agent that
# runs pods as processes), installs kubetune through its Helm chart, puts a tiny Llama-shaped
# model and a word-reversal dataset on a PVC, applies examples/tiny-cpu.yaml with kubectl and
# follows it until the adapter is written. Idempotent: a second run reuses the cluster and the
# binaries and trains again. `make demo-down` stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1
PATH="$PWD/.venv/bin:$PATH"
started=$SECONDS
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Building (or reusing) the control plane and helm from Go modules"
bin=$(bash hack/cluster/build.sh | tail -n 1)
helm=$(bash hack/helm/build.sh | tail -n 1)
kubectl() { "$bin/kubectl" "$@"; }

step "Starting the local cluster"
kubetune local up
KUBECONFIG=$(kubetune local kubeconfig)
export KUBECONFIG

step "Installing kubetune (CRD, operator, RBAC) with helm"
# The local node runs each pod's command on this machine instead of pulling its image, so the
# operator "image" is the kubetune installed in .venv, and pods run as the current user; they
# share this machine's network, so trainers reach the operator's progress port on loopback (and
# one replica: two would share its ports).
"$helm" upgrade --install kubetune charts/kubetune \
  --namespace kubetune-system --create-namespace \
  --set trainer.runAsNonRoot=false --set trainer.runAsUser=0 --set trainer.fsGroup=0 \
  --set operator.jsonLogs=false --set operator.progressIntervalSeconds=2 \
  --set progress.url=https://127.0.0.1:8443/v1/progress --set 'progress.tls.ipAddresses={127.0.0.1}' \
  --set replicaCount=1 \
  --wait --timeout 5m
kubectl -n kubetune-system rollout status deploy/kubetune --timeout=120s

step "Putting a tiny model and a small task dataset on the PVC kubetune-demo"
kubectl apply -f - <<'YAML'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: kubetune-demo}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
YAML
kubectl delete job kubetune-demo-data --ignore-not-found --wait >/dev/null
kubectl apply -f - <<'YAML'
apiVersion: batch/v1
kind: Job
metadata: {name: kubetune-demo-data}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: data
          image: kubetune/trainer
          # A fresh model and data, and no adapter or checkpoints of an earlier demo run (a new
          # FineTuneJob refuses to resume another job's checkpoints).
          command: [sh, -c, "rm -rf /mnt/pvc/kubetune-demo/adapters/tiny-reverse && exec python -m kubetune_devtools.tiny /mnt/pvc/kubetune-demo"]
          volumeMounts: [{name: demo, mountPath: /mnt/pvc/kubetune-demo}]
      volumes: [{name: demo, persistentVolumeClaim: {claimName: kubetune-demo}}]
YAML
kubectl wait --for=condition=Complete job/kubetune-demo-data --timeout=300s >/dev/null
kubectl logs job/kubetune-demo-data

step "kubectl apply -f examples/tiny-cpu.yaml"
kubectl delete ftj tiny-reverse --ignore-not-found --wait >/dev/null
kubectl apply -f examples/tiny-cpu.yaml
kubectl get ftj tiny-reverse

step "Training (kubetune watch tiny-reverse)"
status=0
kubetune watch tiny-reverse --kubeconfig "$KUBECONFIG" --interval 2 || status=$?
kubectl get ftj tiny-reverse -o wide

elapsed=$((SECONDS - started))
if [ "$status" -eq 0 ]; then
  step "Done in $((elapsed / 60))m$((elapsed % 60))s"
  cat <<TXT
The adapter is on the PVC kubetune-demo; status.result above has its sha256.
Try:   export KUBECONFIG=$KUBECONFIG
       kubectl get ftj -o wide                 # printer columns
       kubectl describe ftj tiny-reverse       # conditions and events
       kubetune local status                   # what runs
Stop:  make demo-down
TXT
else
  step "The job did not succeed: kubectl describe ftj tiny-reverse; kubectl logs job/tiny-reverse"
fi
exit "$status"
