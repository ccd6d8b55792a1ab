#!/usr/bin/env bash
# `make demo`: a newcomer's first run, on this machine, in one command.
#
# Starts the local cluster (a real control plane built from Go modules and a real node: the
# upstream kubelet with containerd and runc, running the operator and trainer images built from
# the Dockerfile; as root), installs kubetune
# through its Helm chart, puts a tiny Llama-shaped model and a word-reversal dataset on a PVC,
# applies examples/tiny-cpu.yaml with kubectl and follows it until the adapter is written. Idempotent: a second run reuses the cluster and the
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
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
[ "$(id -u)" = 0 ] || { echo "make demo needs root: the local cluster's node is a real kubelet with containerd and runc (namespaces, cgroups, mounts)" >&2; exit 1; }
step "Building (or reusing) a real node (kubelet, containerd, runc, ...) and the images"
bash hack/node/build.sh >/dev/null
bash hack/images/build.sh >/dev/null
step "Starting the local cluster on a real node"
kubetune local up --image "kubetune/operator:$version" --image "kubetune/trainer:$version"
# The chart unchanged: the operator and the trainer run as its non-root users, read-only root,
# no capabilities, under their limits. The trainers' NetworkPolicy is told where this
# cluster's DNS is (the node's CoreDNS, on its pods' gateway; docs/install.md, "Trainer
# egress"): they find the operator's progress Service by name.
dns=$(python -c 'import ipaddress
from kubetune.local.layout import default_home
from kubetune.local.real_node import NodeState, RealNode
node = NodeState.load(RealNode(default_home(), "kubetune-local").state_dir)
print(ipaddress.IPv4Network(node.pod_network).network_address + 1, node.pod_network)')
read -r dns pods <<<"$dns"
# Trainers of jobs made through kubetune-server download their data from its pod (on this
# node's pod network, which the default egress excepts with the rest of 10.0.0.0/8).
chart_args=(--set "trainer.networkPolicy.dns.cidrs={$dns/32}"
  --set "trainer.networkPolicy.egressCIDRs={0.0.0.0/0,::/0,$pods}")
KUBECONFIG=$(kubetune local kubeconfig)
export KUBECONFIG

# kubetune-server: the OpenAI-compatible fine-tuning API and the console (docs/api.md,
# docs/console.md), offering the tiny model with the example's settings as every job's template.
template=$(python -c 'import json, yaml
spec = yaml.safe_load(open("examples/tiny-cpu.yaml"))["spec"]
for field in ("model", "dataset", "output"):
    spec.pop(field, None)
print(json.dumps(spec))')
server_args=(--set server.enabled=true --set server.defaultNamespace=default
  --set 'server.outputUri=pvc://kubetune-demo/adapters/{job}'
  --set-json 'server.models={"tiny-llama": "pvc://kubetune-demo/model"}'
  --set-json "server.jobTemplate=$template"
  --set "trainer.downloadAllowedCIDRs={10.0.0.0/8}")

step "Installing kubetune (CRD, operator, RBAC, kubetune-server) with helm"
"$helm" upgrade --install kubetune charts/kubetune \
  --namespace kubetune-system --create-namespace "${chart_args[@]}" "${server_args[@]}" \
  --set operator.jsonLogs=false --set operator.progressIntervalSeconds=2 \
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
# The provisioner gives each claim a directory on this machine: the model and data go there
# (fresh, and no adapter or checkpoints of an earlier demo run: a new FineTuneJob refuses to resume
# another job's checkpoints).
for _ in $(seq 240); do
  volume=$(kubectl get pvc kubetune-demo -o jsonpath='{.spec.volumeName}')
  [ -n "$volume" ] && break
  sleep 0.5
done
[ -n "$volume" ] || { echo "the claim kubetune-demo was not bound" >&2; exit 1; }
claim_dir=$(kubectl get pv "$volume" -o jsonpath='{.spec.hostPath.path}')
rm -rf "$claim_dir/adapters/tiny-reverse"
python -m kubetune_devtools.tiny "$claim_dir"
# The trainer (uid 1000) reads them and writes its adapter there.
chmod -R a+rX "$claim_dir"

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
The OpenAI-compatible API and the console (kubetune-server), as a user of namespace default:
       kubectl create serviceaccount demo-user
       kubectl create rolebinding demo-user --clusterrole=edit --serviceaccount=default:demo-user
       kubectl -n kubetune-system port-forward svc/kubetune-server 8080 &
       kubectl create token demo-user          # the bearer token: OPENAI_API_KEY, or the console's login
       open http://127.0.0.1:8080/ui           # the console; the API is http://127.0.0.1:8080/v1
Stop:  make demo-down
TXT
else
  step "The job did not succeed: kubectl describe ftj tiny-reverse; kubectl logs job/tiny-reverse"
fi
exit "$status"
