"""Bounded shapes for the spec's Kubernetes-typed fields (``scheduling.affinity``,
``podTemplate.spec``): every list, map and string has a size limit, in the CRD and in the models.

A free-form field (``x-kubernetes-preserve-unknown-fields``) can't be bounded by the apiserver:
its schema stops at the field, and CEL can't see into it. So these fields carry the Kubernetes
shapes they stand for, written once here as OpenAPI schemas: the CRD embeds them (the apiserver
refuses what is over a bound, and unknown fields are refused by a strict client and dropped
otherwise), and the models check the same bounds (``conforms``, in
:mod:`~kubetune.api.schema_bounds`). Only what kubetune can merge into a trainer pod is spelled
out, plus the fields that the operator's policy refuses by name (host namespaces, identities,
security contexts, commands, hostPath): those must reach it to be refused with a message. No CEL
here: plain OpenAPI bounds cost nothing of the apiserver's CEL budget.
"""

from __future__ import annotations

from typing import Any, Final

Schema = dict[str, Any]

#: Kubernetes' own limits: qualified names (a 253-character prefix, '/', 63), label values,
#: DNS names.
KEY: Final = 317
LABEL: Final = 63
NAME: Final = 253
#: A path in a container or on a volume.
PATH: Final = 512
MAX_KEY: Final = "x-kubetune-max-key-length"


def string(max_length: int, enum: list[str] | None = None) -> Schema:
    node: Schema = {"type": "string", "maxLength": max_length}
    if enum is not None:
        node["enum"] = enum
    return node


def integer() -> Schema:
    return {"type": "integer"}


def boolean() -> Schema:
    return {"type": "boolean"}


def quantity() -> Schema:
    return {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
            "maxLength": 64}  # fmt: skip


def array(items: Schema, max_items: int) -> Schema:
    return {"type": "array", "maxItems": max_items, "items": items}


#: Marks the nodes built here: the CRD generator gives them no ``default: {}`` (an empty
#: ``securityContext`` filled in by the apiserver would be a field the policy refuses).
SHAPE: Final = "x-kubetune-shape"


def obj(required: tuple[str, ...] = (), **properties: Schema) -> Schema:
    node: Schema = {"type": "object", "properties": properties, SHAPE: True}
    if required:
        node["required"] = list(required)
    return node


def one_of(required: tuple[str, ...] = (), **properties: Schema) -> Schema:
    """An object that sets one of ``properties`` (and the ``required`` ones): a volume's
    source, an env var's ``valueFrom``."""
    return {**obj(required, **properties), "maxProperties": len(required) + 1}


def mapping(values: Schema, max_properties: int, key_length: int = KEY) -> Schema:
    """A map of at most ``max_properties`` keys of at most ``key_length`` characters (the
    schema can't bound a key: a CEL rule does, cheap as it is only a size)."""
    return {
        "type": "object",
        "maxProperties": max_properties,
        "additionalProperties": values,
        "x-kubernetes-validations": [
            {
                "rule": f"self.all(k, size(k) <= {key_length})",
                "message": f"keys may not be longer than {key_length} characters",
            }
        ],
        SHAPE: True,
        MAX_KEY: key_length,
    }


# --- scheduling --------------------------------------------------------------------------------

_OPERATORS: Final = ["In", "NotIn", "Exists", "DoesNotExist"]
_NODE_REQUIREMENT: Final = obj(
    ("key", "operator"),
    key=string(KEY),
    operator=string(16, [*_OPERATORS, "Gt", "Lt"]),
    values=array(string(LABEL), 8),
)
_NODE_FIELD: Final = obj(
    ("key", "operator"),
    key=string(64),
    operator=string(16, _OPERATORS),
    values=array(string(NAME), 8),
)
_NODE_TERM: Final = obj(
    matchExpressions=array(_NODE_REQUIREMENT, 4), matchFields=array(_NODE_FIELD, 1)
)
_LABEL_SELECTOR: Final = obj(
    matchLabels=mapping(string(LABEL), 8),
    matchExpressions=array(
        obj(("key", "operator"), key=string(KEY), operator=string(16, _OPERATORS),
            values=array(string(LABEL), 8)),
        4,
    ),
)  # fmt: skip
_POD_TERM: Final = obj(
    ("topologyKey",),
    labelSelector=_LABEL_SELECTOR,
    namespaceSelector=_LABEL_SELECTOR,
    namespaces=array(string(LABEL), 8),
    topologyKey=string(KEY),
    matchLabelKeys=array(string(KEY), 4),
    mismatchLabelKeys=array(string(KEY), 4),
)
_WEIGHT: Final = {"type": "integer", "minimum": 1, "maximum": 100}


def _pod_affinity() -> Schema:
    return obj(
        requiredDuringSchedulingIgnoredDuringExecution=array(_POD_TERM, 2),
        preferredDuringSchedulingIgnoredDuringExecution=array(
            obj(("weight", "podAffinityTerm"), weight=_WEIGHT, podAffinityTerm=_POD_TERM), 2
        ),
    )


#: core/v1 Affinity, bounded.
AFFINITY: Final = obj(
    nodeAffinity=obj(
        requiredDuringSchedulingIgnoredDuringExecution=obj(nodeSelectorTerms=array(_NODE_TERM, 4)),
        preferredDuringSchedulingIgnoredDuringExecution=array(
            obj(("weight", "preference"), weight=_WEIGHT, preference=_NODE_TERM), 4
        ),
    ),
    podAffinity=_pod_affinity(),
    podAntiAffinity=_pod_affinity(),
)

_TOLERATION: Final = obj(
    key=string(KEY),
    operator=string(16, ["Exists", "Equal"]),
    value=string(LABEL),
    effect=string(16, ["NoSchedule", "PreferNoSchedule", "NoExecute"]),
    tolerationSeconds=integer(),
)

# --- the pod template ----------------------------------------------------------------------------

_SE_LINUX: Final = obj(user=string(NAME), role=string(NAME), type=string(NAME), level=string(NAME))
_PROFILE: Final = obj(type=string(32), localhostProfile=string(PATH))
_WINDOWS: Final = obj(gmsaCredentialSpecName=string(NAME), gmsaCredentialSpec=string(4096),
                      runAsUserName=string(NAME), hostProcess=boolean())  # fmt: skip
_CONTAINER_SECURITY: Final = obj(
    capabilities=obj(add=array(string(64), 16), drop=array(string(64), 16)),
    privileged=boolean(),
    seLinuxOptions=_SE_LINUX,
    windowsOptions=_WINDOWS,
    runAsUser=integer(),
    runAsGroup=integer(),
    runAsNonRoot=boolean(),
    readOnlyRootFilesystem=boolean(),
    allowPrivilegeEscalation=boolean(),
    procMount=string(32),
    seccompProfile=_PROFILE,
    appArmorProfile=_PROFILE,
)
_POD_SECURITY: Final = obj(
    seLinuxOptions=_SE_LINUX,
    windowsOptions=_WINDOWS,
    runAsUser=integer(),
    runAsGroup=integer(),
    runAsNonRoot=boolean(),
    supplementalGroups=array(integer(), 32),
    supplementalGroupsPolicy=string(32),
    fsGroup=integer(),
    fsGroupChangePolicy=string(32),
    sysctls=array(obj(("name", "value"), name=string(NAME), value=string(NAME)), 8),
    seccompProfile=_PROFILE,
    appArmorProfile=_PROFILE,
    seLinuxChangePolicy=string(32),
)
_KEY_REF: Final = obj(("key",), name=string(NAME), key=string(NAME), optional=boolean())
_FIELD_REF: Final = obj(("fieldPath",), apiVersion=string(64), fieldPath=string(256))
_RESOURCE_REF: Final = obj(
    ("resource",), containerName=string(LABEL), resource=string(64), divisor=quantity()
)
_ENV: Final = obj(
    ("name",),
    name=string(256),
    value=string(1024),
    valueFrom=one_of(
        fieldRef=_FIELD_REF,
        resourceFieldRef=_RESOURCE_REF,
        configMapKeyRef=_KEY_REF,
        secretKeyRef=_KEY_REF,
    ),
)
_SOURCE_REF: Final = obj(name=string(NAME), optional=boolean())
_RESOURCES: Final = obj(
    limits=mapping(quantity(), 16, NAME),
    requests=mapping(quantity(), 16, NAME),
    claims=array(obj(("name",), name=string(LABEL), request=string(LABEL)), 8),
)
_CONTAINER: Final = obj(
    ("name",),
    name=string(LABEL),
    env=array(_ENV, 32),
    envFrom=array(
        obj(prefix=string(256), configMapRef=_SOURCE_REF, secretRef=_SOURCE_REF), 8
    ),
    resources=_RESOURCES,
    volumeMounts=array(
        obj(
            ("name", "mountPath"),
            name=string(LABEL),
            mountPath=string(PATH),
            subPath=string(PATH),
            subPathExpr=string(PATH),
            readOnly=boolean(),
            recursiveReadOnly=string(32),
            mountPropagation=string(32),
        ),
        16,
    ),
    ports=array(
        obj(("containerPort",), name=string(15), containerPort=integer(), hostPort=integer(),
            hostIP=string(64), protocol=string(8)),
        8,
    ),
    # Refused by the operator's policy whatever the settings say: here so that it can say so.
    image=string(512),
    imagePullPolicy=string(16),
    command=array(string(PATH), 8),
    args=array(string(PATH), 8),
    workingDir=string(PATH),
    securityContext=_CONTAINER_SECURITY,
)  # fmt: skip
_ITEMS: Final = array(obj(("key", "path"), key=string(NAME), path=string(PATH), mode=integer()), 8)
_DOWNWARD_ITEMS: Final = array(
    obj(("path",), path=string(PATH), fieldRef=_FIELD_REF, resourceFieldRef=_RESOURCE_REF,
        mode=integer()),
    4,
)  # fmt: skip
_VOLUME: Final = one_of(
    ("name",),
    name=string(LABEL),
    emptyDir=obj(medium=string(16), sizeLimit=quantity()),
    configMap=obj(name=string(NAME), items=_ITEMS, defaultMode=integer(), optional=boolean()),
    secret=obj(secretName=string(NAME), items=_ITEMS, defaultMode=integer(), optional=boolean()),
    persistentVolumeClaim=obj(("claimName",), claimName=string(NAME), readOnly=boolean()),
    downwardAPI=obj(items=_DOWNWARD_ITEMS, defaultMode=integer()),
    projected=obj(
        defaultMode=integer(),
        sources=array(
            one_of(
                configMap=obj(name=string(NAME), items=_ITEMS, optional=boolean()),
                secret=obj(name=string(NAME), items=_ITEMS, optional=boolean()),
                downwardAPI=obj(items=_DOWNWARD_ITEMS),
                serviceAccountToken=obj(("path",), audience=string(NAME),
                                        expirationSeconds=integer(), path=string(PATH)),
            ),
            2,
        ),
    ),
    ephemeral=obj(
        volumeClaimTemplate=obj(
            ("spec",),
            metadata=obj(labels=mapping(string(LABEL), 8), annotations=mapping(string(512), 8)),
            spec=obj(
                accessModes=array(string(32), 4),
                storageClassName=string(NAME),
                volumeMode=string(16),
                resources=obj(requests=mapping(quantity(), 4, NAME),
                              limits=mapping(quantity(), 4, NAME)),
            ),
        )
    ),
    # Refused by the operator's policy (it reaches the node): here so that it can say so.
    hostPath=obj(("path",), path=string(PATH), type=string(32)),
)  # fmt: skip

#: The part of core/v1 PodSpec that ``spec.podTemplate.spec`` may carry, bounded. Fields kubetune
#: never merges (init or ephemeral containers, overhead, ...) are not here: the apiserver refuses
#: them (strict clients, kubectl's default) or drops them, and the operator's policy refuses them
#: by name where they reach it.
POD_SPEC: Final = {
    **obj(
        containers=array(_CONTAINER, 1),
        volumes=array(_VOLUME, 8),
        tolerations=array(_TOLERATION, 32),
        nodeSelector=mapping(string(LABEL), 32),
        topologySpreadConstraints=array(
            obj(
                ("maxSkew", "topologyKey", "whenUnsatisfiable"),
                maxSkew=integer(),
                topologyKey=string(KEY),
                whenUnsatisfiable=string(32),
                labelSelector=_LABEL_SELECTOR,
                minDomains=integer(),
                nodeAffinityPolicy=string(16),
                nodeTaintsPolicy=string(16),
                matchLabelKeys=array(string(KEY), 4),
            ),
            4,
        ),
        runtimeClassName=string(NAME),
        priorityClassName=string(NAME),
        schedulerName=string(NAME),
        schedulingGates=array(obj(("name",), name=string(KEY)), 8),
        imagePullSecrets=array(obj(name=string(NAME)), 8),
        dnsPolicy=string(32),
        dnsConfig=obj(
            nameservers=array(string(64), 3),
            searches=array(string(NAME), 6),
            options=array(obj(name=string(NAME), value=string(NAME)), 8),
        ),
        terminationGracePeriodSeconds=integer(),
        activeDeadlineSeconds=integer(),
        enableServiceLinks=boolean(),
        preemptionPolicy=string(32),
        # Refused by the operator's policy whatever the settings say: here so that it can say so.
        hostNetwork=boolean(),
        hostPID=boolean(),
        hostIPC=boolean(),
        hostUsers=boolean(),
        shareProcessNamespace=boolean(),
        nodeName=string(NAME),
        serviceAccountName=string(NAME),
        serviceAccount=string(NAME),
        automountServiceAccountToken=boolean(),
        restartPolicy=string(16),
        hostname=string(LABEL),
        subdomain=string(LABEL),
        setHostnameAsFQDN=boolean(),
        securityContext=_POD_SECURITY,
    ),
    "maxProperties": 32,
}
